"""`loraflow eval` and the promotion gate, on adapters really trained on the tiny Llama.

orders@v1 is trained on the synthetic extraction task; orders@v2 on the same
prompts with their answers shuffled (right format, wrong fields). Both are
evaluated through vLLM and the gateway: v1 by `loraflow eval` starting its own
engine (as `serve` would), v2 through a configured, running gateway. The gate
must pass v1 and refuse v2, and vLLM's greedy answers must be PEFT's.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loraflow.registry.service import Registry
from loraflow.registry.settings import ServerSettings, Settings
from loraflow.trainer.eval.regression_suite import load_suite
from tests.e2e.conftest import Assets, run_gateway
from tests.factories import write_lm_eval_tasks
from tests.training_cache import TrainingCache

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent

# The policy under test, as a deployment writes it. The tiny base is random: it has no general
# ability to forget, so the regression rule only has to tolerate the suite's noise.
GATE_TOML = """
[gate.default]
primary_metric = "token_f1"
min_gain_over_production = 0.01
min_gain_over_base = 0.0
max_regression_drop = 0.05
min_json_valid = 0.5

[eval]
few_shot = 2
max_tokens = 48
"""


def _train(
    cache: TrainingCache, reg: Registry, settings: Settings, base: Path, data: str, root: Path, tag: str
) -> Any:
    from loraflow.trainer.config import TrainConfig

    config = TrainConfig(
        adapter="orders",
        base=str(base),
        data=data,
        r=16,
        alpha=32,
        learning_rate=3e-3,
        epochs=8,
        early_stopping_patience=4,
        batch_size=16,
        dropout=0.0,
        eval_steps=25,
        max_new_tokens=48,
        output_dir=root / f"run-{tag}",
    )
    return cache.train(config, registry=reg, settings=settings)  # trained once per test run


@pytest.fixture(scope="module")
def trained(
    assets: Assets, artifact_uri: str, training_cache: TrainingCache, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    from loraflow.trainer.data import validate_file, validate_for_base
    from loraflow.trainer.prepare import load_split, prepare
    from loraflow.trainer.synthetic import make_rows, write_jsonl

    root = tmp_path_factory.mktemp("eval")
    work = root / "work"
    work.mkdir()
    (work / "loraflow.toml").write_text(GATE_TOML)
    settings = Settings(home=root / "home", artifact_uri=artifact_uri)
    reg = Registry.open(settings)
    data = write_jsonl(root / "orders.jsonl", make_rows(500, seed=0))
    good, _ = prepare(validate_for_base(data, str(assets.base), max_length=256), name="orders", registry=reg)
    # Wrong labels: the training prompts of orders@v1 with their answers shuffled among them.
    train_rows = load_split(reg, good, "train")
    answers = [r["messages"][-1]["content"] for r in train_rows]
    random.Random(1).shuffle(answers)
    shuffled = [
        {"messages": [*r["messages"][:-1], {"role": "assistant", "content": a}]}
        for r, a in zip(train_rows, answers, strict=True)
    ]
    bad_file = write_jsonl(root / "shuffled.jsonl", shuffled)
    bad, _ = prepare(validate_file(bad_file), name="orders-shuffled", registry=reg)
    v1 = _train(training_cache, reg, settings, assets.base, good.ref, root, "good")
    v2 = _train(training_cache, reg, settings, assets.base, bad.ref, root, "shuffled")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LORAFLOW_")},
        "LORAFLOW_HOME": str(root / "home"),
        "LORAFLOW_ARTIFACT_URI": artifact_uri,
    }
    yield {"root": root, "work": work, "registry": reg, "settings": settings, "v1": v1, "v2": v2, "env": env}
    reg.close()


def cli(t: dict[str, Any], *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> Any:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=t["work"],
        env={**t["env"], **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def v1_gated(trained: dict[str, Any]) -> dict[str, Any]:
    """orders@v1 evaluated and promoted through the gate, once per module: what the first test
    checks, and the production the second compares against, so that either runs alone."""
    html = trained["root"] / "v1.html"
    # No gateway configured: eval starts an engine and the gateway itself, the way `serve` does.
    evaluated = cli(trained, "loraflow", "eval", "orders@v1", "--json", "--html", str(html))
    promoted = cli(trained, "adapters", "promote", "orders", "v1") if evaluated.returncode == 0 else None
    return {"html": html, "eval": evaluated, "promote": promoted}


def test_trained_adapter_beats_the_prompted_base_and_passes_the_gate(
    trained: dict[str, Any], v1_gated: dict[str, Any]
) -> None:
    html, done = v1_gated["html"], v1_gated["eval"]
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["engine"]["gateway"] == "in-process" and report["engine"]["vllm"]
    assert report["dataset"] == "orders@v1" and report["split"] == "test" and report["sealed"]["checked"]
    assert list(report["systems"]) == ["base", "candidate"] and report["production"] is None
    assert report["primary_metric"] == "token_f1"  # from the config's policy
    assert set(report["metrics"]) >= {"exact_match", "token_f1", "rouge_l", "json_valid", "stop_rate"}
    cand, base = report["systems"]["candidate"]["metrics"], report["systems"]["base"]["metrics"]
    assert cand["token_f1"]["mean"] > base["token_f1"]["mean"]
    assert cand["exact_match"]["mean"] >= base["exact_match"]["mean"]
    gain = report["comparisons"]["base"]["token_f1"]
    assert gain["ci"][0] > 0, gain  # a win outside the noise
    assert cand["json_valid"]["mean"] >= 0.5 and base["json_valid"]["mean"] == 0.0
    # The prompted base saw few-shot examples from the train split, never from test.
    assert report["prompts"]["few_shot"] == 2 and report["prompts"]["few_shot_from"] == "orders@v1 train"
    assert report["regression"]["n"] == len(load_suite()) and report["regression"]["metric"] == "answer_match"
    assert set(report["regression"]["systems"]) == {"base", "candidate"}
    assert report["gate"]["passed"] is True, report["gate"]
    assert html.is_file() and "<svg" in html.read_text()

    # Stored on the version: the registry hands back exactly this report.
    reg: Registry = trained["registry"]
    (stored,) = reg.evaluations("orders", 1)
    assert stored.id == report["evaluation"] and stored.split_digest == report["split_digest"]
    assert stored.report == {k: v for k, v in report.items() if k not in ("evaluation", "gate")}
    # Its page is kept beside it: the --html page less the gate's verdict, which is about the moment.
    from loraflow.trainer.reports.eval_page import render_html

    assert stored.page_digest is not None
    page = reg.page(stored.page_digest)
    assert page == render_html(stored.report)
    assert 'id="gate"' not in page and 'id="gate"' in html.read_text()
    assert page.split('<section id="summary">')[1] == html.read_text().split('<section id="summary">')[1]

    # vLLM through the gateway answers the held-out prompts exactly as PEFT did at the end of training.
    peft = {json.dumps(ex["prompt"]): ex["adapter"]["text"] for ex in trained["v1"].eval_report["examples"]}
    test_rows = _split(reg, "orders@v1", "test")
    vllm = {
        json.dumps(row["messages"][:-1]): ex["outputs"]["candidate"]["text"]
        for row, ex in zip(test_rows, report["examples"], strict=True)
    }
    shared = peft.keys() & vllm.keys()
    assert len(shared) >= 10
    assert {k: vllm[k] for k in shared} == {k: peft[k] for k in shared}

    # The gate passed, so promote (without --force) moved production to it.
    done = v1_gated["promote"]
    assert done.returncode == 0, done.stderr
    assert reg.get("orders").aliases == {"production": 1}


def _split(reg: Registry, dataset: str, split: str) -> list[dict[str, Any]]:
    from loraflow.trainer.prepare import load_split

    return load_split(reg, reg.get_dataset(dataset), split)


def test_shuffled_labels_fail_the_gate_and_promote_is_refused(
    trained: dict[str, Any], v1_gated: dict[str, Any], engine_url: str, assets: Assets, tmp_path: Path
) -> None:
    reg: Registry = trained["registry"]
    promoted = v1_gated["promote"]
    assert promoted is not None and promoted.returncode == 0, "orders@v1 could not be promoted"
    assert reg.get("orders").aliases == {"production": 1}
    settings = Settings(home=tmp_path / "gw", server=ServerSettings(poll_interval_s=0.1))
    for gateway in run_gateway(settings, reg, [engine_url], assets.base):
        # A running gateway is configured: eval generates through it. The gateway's own base model
        # is the judge here, so the judge path runs for real (its verdicts are unparseable noise).
        env = {
            "LORAFLOW_EVAL__GATEWAY_URL": gateway.url,
            "LORAFLOW_EVAL__JUDGE__URL": f"{gateway.url}/v1",
            "LORAFLOW_EVAL__JUDGE__MODEL": "tiny-llama",
            "LORAFLOW_EVAL__JUDGE__MAX_TOKENS": "16",
            # An lm-eval task over a local file joins the regression suites.
            "LORAFLOW_EVAL__LM_EVAL__TASKS": '["loraflow_capitals"]',
            "LORAFLOW_EVAL__LM_EVAL__INCLUDE_PATH": str(write_lm_eval_tasks(tmp_path / "tasks")),
            "LORAFLOW_EVAL__LM_EVAL__LIMIT": "4",
            "LORAFLOW_EVAL__LM_EVAL__METRICS": '{"loraflow_capitals": "exact_match"}',
        }
        done = cli(trained, "loraflow", "eval", "orders@v2", "--dataset", "orders@v1", "--json", env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout)
        assert report["engine"]["gateway"] == gateway.url
        assert list(report["systems"]) == ["base", "production", "candidate"]
        assert report["production"] == {"version": 1}
        assert report["sealed"] == {"checked": True, "trained_on": "orders-shuffled@v1", "overlap": 0}
        # Right format, wrong fields: no gain over production that the policy would call one.
        loss = report["comparisons"]["production"]["token_f1"]
        assert loss["diff"] < 0.01 and loss["ci"][0] <= 0, loss
        judge = report["judge"]
        assert judge["model"] == "tiny-llama" and set(judge["systems"]) == set(report["systems"])
        assert all(s["scored"] + s["unparsed"] == report["n"] for s in judge["systems"].values())
        first = report["examples"][0]["outputs"]["candidate"]["judge"]
        assert set(first) == {"score", "reasoning"}  # every verdict keeps the judge's words
        (task,) = report["lm_eval"]["tasks"]
        assert task["suite"] == "lm-eval:loraflow_capitals" and task["metric"] == "exact_match,none"
        assert task["n"] == 4 and set(task["systems"]) == set(report["systems"])
        assert set(task["comparisons"]) == {"base", "production"}
        gated = [r["detail"] for r in report["gate"]["rules"] if r["rule"] == "regression"]
        assert len(gated) == 2 and "lm-eval:loraflow_capitals" in gated[1]
        assert report["gate"]["passed"] is False

        done = cli(trained, "adapters", "promote", "orders", "v2")
        assert done.returncode == 4, done.stdout + done.stderr
        assert "beats_production" in done.stderr and "short by" in done.stderr
        assert reg.get("orders").aliases == {"production": 1}

    # Its own training data's validation split is not held out: refused, naming the field.
    done = cli(trained, "loraflow", "eval", "orders@v2", "--split", "val")
    assert done.returncode == 2 and "not held out" in done.stderr
    # Nor is another dataset's split that contains examples it was trained on.
    done = cli(
        trained, "loraflow", "eval", "orders@v2", "--dataset", "orders-shuffled@v1", "--split", "train"
    )
    assert done.returncode == 2 and "not held out" in done.stderr
    assert len(reg.evaluations("orders", 2)) == 1  # refusals stored nothing
