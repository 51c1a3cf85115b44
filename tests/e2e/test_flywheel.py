"""The flywheel end to end on the tiny Llama: served traffic with feedback becomes a dataset, a candidate,
and a gated promotion; a candidate trained on poisoned corrections is refused and production stays.

orders@v1 is production but undertrained (a few steps). Users send new order sentences, some with an
e-mail address in them; reviewers correct the answers through /v1/feedback. `loraflow flywheel run`
(a subprocess, as a CronJob runs it) builds orders@v2's dataset from that traffic, trains it with
the flywheel's config, evaluates it through the running gateway and, the gate passing, promotes it.
A second round whose corrections are shuffled (right format, wrong fields) yields a candidate the
gate refuses: it goes to staging only. No raw e-mail address is anywhere on disk afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings, load_settings
from tests.e2e.conftest import Assets, Gateway, run_gateway
from tests.factories import FORCED
from tests.services import SHARED_ARTIFACT_URI

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent
EMAIL = "jane.roe@example.org"

CONFIG = """
[gate.default]
primary_metric = "token_f1"
min_gain_over_production = 0.01
min_gain_over_base = 0.0
min_json_valid = 0.5

[eval]
few_shot = 2
max_tokens = 48
regression = false

[traffic]
sample_rate = 1.0
flush_interval_s = 0.05
pseudonym_key = "flywheel-test-key"

[flywheel]
auto_promote = ["orders"]
min_examples = 10
test_fraction = 0.25
replay_share = 0.5

[flywheel.train]
max_steps = -1
epochs = 30
batch_size = 8
early_stopping_patience = 6
"""


@pytest.fixture(scope="module")
def world(
    assets: Assets, artifact_uri: str, engine_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    from loraflow.trainer.config import TrainConfig
    from loraflow.trainer.data import validate_for_base
    from loraflow.trainer.prepare import prepare
    from loraflow.trainer.synthetic import make_rows, write_jsonl
    from loraflow.trainer.train import train

    root = tmp_path_factory.mktemp("flywheel")
    work = root / "work"
    work.mkdir()
    (work / "loraflow.toml").write_text(CONFIG)
    saved = Path.cwd()
    os.chdir(work)  # the settings file, as every process here reads it
    try:
        settings = load_settings(home=root / "home", artifact_uri=artifact_uri)
    finally:
        os.chdir(saved)
    reg = Registry.open(settings)
    data = write_jsonl(root / "orders.jsonl", make_rows(120, seed=0))
    ds, _ = prepare(validate_for_base(data, str(assets.base), max_length=256), name="orders", registry=reg)
    config = TrainConfig(
        adapter="orders",
        base=str(assets.base),
        data=ds.ref,
        r=16,
        alpha=32,
        learning_rate=3e-3,
        max_steps=3,  # production is undertrained: the flywheel's candidate has room to beat it
        batch_size=16,
        dropout=0.0,
        eval_steps=25,
        eval_generations=0,
        output_dir=root / "run-v1",
    )
    train(config, registry=reg, settings=settings)
    reg.promote("orders", 1, force=True, reason=FORCED)
    gateway_settings = settings.model_copy(
        update={"server": settings.server.model_copy(update={"poll_interval_s": 0.1})}
    )
    with run_gateway_ctx(gateway_settings, reg, engine_url, assets.base) as gw:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LORAFLOW_")},
            "LORAFLOW_HOME": str(root / "home"),
            "LORAFLOW_ARTIFACT_URI": artifact_uri,
            "LORAFLOW_EVAL__GATEWAY_URL": gw.url,
        }
        yield {"root": root, "work": work, "registry": reg, "gateway": gw, "env": env}
    reg.close()


def run_gateway_ctx(settings: Settings, reg: Registry, engine_url: str, base: Path) -> Any:
    from contextlib import contextmanager

    return contextmanager(run_gateway)(settings, reg, [engine_url], base)


def cli(w: dict[str, Any], *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "loraflow"), *args],
        cwd=w["work"],
        env=w["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def serve_and_correct(w: dict[str, Any], seed: int, n: int, *, poison: bool) -> None:
    """Users ask; reviewers answer every response with a correction (the truth, or a poisoned one)."""
    from loraflow.trainer.data import normalize
    from loraflow.trainer.synthetic import make_rows

    gw: Gateway = w["gateway"]
    rows = make_rows(n, seed=seed)
    truths = [str(r["output"]) for r in rows]
    if poison:
        truths = truths[1:] + truths[:1]  # each correction is another request's answer
    with httpx.Client(base_url=gw.url, timeout=120) as http:
        for i, row in enumerate(rows):
            messages = [m.model_dump() for m in normalize(row, i + 1).messages][:-1]
            if i % 4 == 0:
                messages[-1]["content"] += f" (reply to {EMAIL})"
            r = http.post(
                "/v1/chat/completions", json={"model": "orders", "messages": messages, "max_tokens": 48}
            )
            assert r.status_code == 200, r.text
            fb = http.post(
                "/v1/feedback",
                json={"request_id": r.headers["x-request-id"], "rating": -1, "correction": truths[i]},
            )
            assert fb.status_code == 200, fb.text
    recorder = gw.app.state.gateway.recorder
    w["feedback"] = w.get("feedback", 0) + n
    deadline = time.monotonic() + 30
    while recorder.written["feedback"] < w["feedback"]:
        assert time.monotonic() < deadline, "the feedback was not written within 30 s"
        time.sleep(0.05)


def until_now() -> str:
    return (datetime.now(UTC) + timedelta(minutes=1)).isoformat()


@pytest.fixture(scope="module")
def first_round(world: dict[str, Any]) -> dict[str, Any]:
    """The first round, which every test here builds on (each can run alone): traffic with true
    corrections, `flywheel run`, and the same window run again. What the tests check of the
    registry is read here, before a later round changes it."""
    serve_and_correct(world, seed=11, n=60, poison=False)
    done = cli(world, "flywheel", "run", "orders", "--since", "1h", "--until", until_now(), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    cycle = json.loads(done.stdout)
    reg: Registry = world["registry"]
    production = reg.get("orders").aliases.get("production")
    v2 = reg.get_version("orders", 2) if production == 2 else None
    ds = reg.get_dataset(v2.dataset or "") if v2 is not None else None
    again = None
    if ds is not None:  # the same window again (asserted on below)
        again = cli(world, "flywheel", "run", "orders", "--since", "1h", "--until", cycle_until(ds), "--json")
    return {
        "cycle": cycle,
        "production": production,
        "dataset": ds,
        "v1_test_count": reg.get_dataset("orders@v1").counts["test"],
        "again": again,
        "versions_after_again": len(reg.get("orders").versions),
    }


def test_traffic_with_feedback_becomes_a_candidate_that_is_promoted(first_round: dict[str, Any]) -> None:
    cycle = first_round["cycle"]
    steps = {s["step"]: s for s in cycle["steps"]}
    assert steps["dataset"]["status"] == "registered"
    traffic = steps["dataset"]["traffic"]
    assert traffic["corrected"] == 60 and traffic["new_examples"] >= 40, traffic
    assert steps["train"]["status"] == "trained"
    assert steps["gate"]["status"] == "passed", json.dumps(steps["gate"]["gate"]["rules"])
    assert cycle["candidate"] == "orders@v2" and cycle["promoted_to"] == "production"
    assert first_round["production"] == 2
    ds = first_round["dataset"]
    assert ds.lineage["kind"] == "traffic" and ds.lineage["previous"] == "orders@v1"
    assert ds.counts["test"] > first_round["v1_test_count"]  # old test kept, fresh added

    # The same window again: every step is found done, nothing is trained twice.
    again = first_round["again"]
    assert again.returncode == 0, again.stdout + again.stderr
    statuses = {s["step"]: s["status"] for s in json.loads(again.stdout)["steps"]}
    assert statuses["dataset"] == "found by digest" and statuses["train"].startswith("skipped")
    assert statuses["evaluate"].startswith("skipped") and first_round["versions_after_again"] == 2


def cycle_until(ds: Any) -> str:
    return str(ds.lineage["window"]["end"])


def test_a_candidate_trained_on_poisoned_corrections_is_refused(
    world: dict[str, Any], first_round: dict[str, Any]
) -> None:
    assert first_round["production"] == 2, "the first round's candidate was not promoted"
    serve_and_correct(world, seed=23, n=60, poison=True)
    reg: Registry = world["registry"]
    # The window holds the first round too: it is in orders@v2's dataset already, so it is dropped.
    done = cli(world, "flywheel", "run", "orders", "--since", "1h", "--until", until_now(), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    cycle = json.loads(done.stdout)
    steps = {s["step"]: s for s in cycle["steps"]}
    assert steps["gate"]["status"] == "refused"
    assert cycle["promoted_to"] == "staging"
    adapter = reg.get("orders")
    assert adapter.aliases["production"] == 2 and adapter.aliases["staging"] == 3
    assert steps["dataset"]["traffic"]["dropped_seen_before"] >= 40


def test_no_raw_pii_anywhere_on_disk(world: dict[str, Any], first_round: dict[str, Any]) -> None:
    """The test's home (registry, runs, logs) and the artifact store (adapters, datasets, traffic):
    the session's bucket, which every e2e test writes to."""
    import s3fs

    leaked, files = [], 0
    for path in Path(world["root"]).rglob("*"):
        if path.is_file():
            files += 1
            if EMAIL.encode() in path.read_bytes():
                leaked.append(str(path))
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    store = SHARED_ARTIFACT_URI.removeprefix("s3://")
    traffic = b""
    for key in fs.find(store):
        files += 1
        data = fs.cat_file(key)
        if EMAIL.encode() in data:
            leaked.append(key)
        if key.startswith(f"{store}/traffic/") and key.endswith(".jsonl"):
            traffic += data
    assert not leaked, leaked
    assert b"<EMAIL_ADDRESS_" in traffic and files > 100  # it was there, and was replaced
