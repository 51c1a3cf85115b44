"""lm-eval tasks in the regression suite: real lm-eval, its local-chat-completions model, through a
real gateway on a socket (the engine behind it is the HTTP-boundary fake, so answers are chosen here).
The task reads a local JSON file, so nothing needs the Hub."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from loraflow.registry.errors import InvalidArgumentError, MissingDependencyError
from loraflow.registry.gate import regression_suites
from loraflow.registry.keys import create_key
from loraflow.registry.settings import LmEvalSettings
from loraflow.server.embedded import serve_in_thread
from loraflow.server.engine.supervisor import free_port
from loraflow.trainer.eval.client import GatewayClient
from loraflow.trainer.eval.lm_eval_suite import LmEvalSuites
from loraflow.trainer.eval.scoring import Bootstrap
from tests.factories import CAPITALS, write_lm_eval_tasks
from tests.fake_vllm import BASE_ID, Setup, gateway, gateway_setup

__all__ = ["gateway_setup"]  # the fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _answer(body: dict[str, Any]) -> str:
    """The base knows every capital; the adapter has forgotten all but France's."""
    question = body["messages"][-1]["content"]
    country = next(c for c in CAPITALS if c in question)
    adapter = "@" in body["model"]  # the engine is asked for NAME@vN+DIGEST, or for the base by path
    return CAPITALS[country] if not adapter or country == "France" else "Paris"


def test_a_task_is_run_per_system_through_the_gateway_and_paired_per_example(
    gateway_setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = LmEvalSettings(
        tasks=["loraflow_capitals"], include_path=write_lm_eval_tasks(tmp_path / "tasks")
    )
    suites = LmEvalSuites(settings)
    assert suites.keys == {"loraflow_capitals": "exact_match,none"}  # the first per-example metric
    key, _ = create_key(gateway_setup.registry, "eval", scopes=["base"])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-someone-elses")  # lm-eval's default; must not be sent
    client = gateway(gateway_setup, auth=True)
    (engine,) = gateway_setup.engines
    engine.answer = _answer
    with serve_in_thread(client.app, free_port(), timeout_s=30) as url:  # type: ignore[arg-type]
        part = suites.run(
            GatewayClient(url, api_key=key, timeout_s=30.0, concurrency=2),
            {"base": BASE_ID, "candidate": "support"},
            Bootstrap(samples=200, seed=0),
            seed=0,
        )
    (entry,) = part["tasks"]
    assert entry["suite"] == "lm-eval:loraflow_capitals" and entry["n"] == len(CAPITALS)
    assert entry["metric"] == "exact_match,none" and entry["higher_is_better"] is True
    assert entry["systems"]["base"]["mean"] == 1.0
    assert entry["systems"]["candidate"]["mean"] == pytest.approx(1 / len(CAPITALS))
    assert entry["comparisons"]["base"]["diff"] == pytest.approx(1 / len(CAPITALS) - 1)
    assert entry["aggregate"] == {"base": 1.0, "candidate": pytest.approx(0.2)}  # lm-eval's own numbers
    # Every request went through the gateway as chat, naming each system's model, with the task's stop.
    asked = [(r["model"], r["messages"][-1]["content"], r["stop"]) for r in engine.requests]
    assert len(asked) == 2 * len(CAPITALS) and {a[2][0] for a in asked} == {"\n"}
    assert len({m for m, _, _ in asked}) == 2  # the base, and support's production version
    assert regression_suites({"regression": None, "lm_eval": part}) == [entry]


def test_tasks_are_checked_before_anything_is_generated(tmp_path: Path) -> None:
    tasks = write_lm_eval_tasks(tmp_path / "tasks")

    def refused(match: str, param: str = "eval.lm_eval.tasks", **kw: Any) -> None:
        with pytest.raises(InvalidArgumentError, match=match) as exc:
            LmEvalSuites(LmEvalSettings(**({"tasks": ["loraflow_capitals"], "include_path": tasks} | kw)))
        assert exc.value.param == param

    refused("'no_such_task' is not an lm-eval task", tasks=["no_such_task"])
    refused("'loraflow_capitals' is named twice", tasks=["loraflow_capitals", "loraflow_capitals"])
    mc = write_lm_eval_tasks(tmp_path / "mc", output_type="multiple_choice")
    refused("'loraflow_capitals' is a multiple_choice task", include_path=mc)
    refused("include_path", param="eval.lm_eval.include_path", include_path=tmp_path / "missing")
    metrics = "eval.lm_eval.metrics"
    refused(r"eval\.lm_eval\.metrics names other", metrics, metrics={"other": "x"})
    refused("'f1' is not among its metrics", metrics, metrics={"loraflow_capitals": "f1"})
    refused("'bleu' is aggregated over the whole corpus", metrics, metrics={"loraflow_capitals": "bleu"})
    refused("filter 'strict' is not among", metrics, metrics={"loraflow_capitals": "exact_match,strict"})
    ok = LmEvalSuites(LmEvalSettings(tasks=["loraflow_capitals"], include_path=tasks, metrics={}))
    assert ok.keys == {"loraflow_capitals": "exact_match,none"}
    # The task index is cached per folder, but an edited task file is read again.
    write_lm_eval_tasks(tasks, output_type="multiple_choice")
    refused("'loraflow_capitals' is a multiple_choice task")


def test_without_lm_eval_installed_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"loraflow\[lm-eval\]"):
        LmEvalSuites(LmEvalSettings(tasks=["loraflow_capitals"], include_path=tmp_path))
