"""`adapters rollout start|status|pause|resume|abort`: the steps they ask for, the status table and
its JSON, the gate at start, and errors that change nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraflow.cli.main import app
from loraflow.registry.domain import RolloutStep
from loraflow.registry.rollouts import Tally
from loraflow.registry.service import Registry
from loraflow.registry.settings import load_settings
from tests.factories import FORCE, make_adapter, register_dataset, run_loraflow

pytestmark = pytest.mark.unit
runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["adapters", "rollout", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def reg(base_dir: Path, tmp_path: Path) -> Registry:
    """``support``: v1 in production, v2 without an eval report (the gate refuses it); both trained
    on a JSON dataset, so the format guard applies."""
    r = Registry.open(load_settings())
    register_dataset(r, "tickets", tmp_path / "ds", profile={"format": {"json_share": 0.9}})
    for seed in (1, 2):
        r.register(
            "support",
            make_adapter(tmp_path / f"a{seed}", seed=seed),
            base_model=str(base_dir),
            dataset="tickets@v1",
        )
    r.promote("support", 1, force=True, reason=FORCE[2])
    return r


def test_start_checks_the_gate_and_the_flags_shape_the_steps(reg: Registry) -> None:
    code, _, stderr = invoke("start", "support@v2")
    assert code == 4 and "gate" in stderr and reg.rollout("support") is None  # refused: nothing started
    code, _, stderr = invoke("start", "support@v2", "--force")
    assert code == 2 and "--reason" in stderr and reg.rollout("support") is None
    code, stdout, _ = invoke("start", "support@v2", "--canary", "0", "--json")
    assert code == 2 and json.loads(stdout)["error"]["param"] == "canary"
    code, _, stderr = invoke("start", "support@v2", "--canary", "100", *FORCE)
    assert code == 2 and "adapters promote" in stderr and reg.rollout("support") is None

    code, stdout, _ = invoke("start", "support@v2", "--shadow", "10", "--canary", "20", *FORCE, "--json")
    assert code == 0, stdout
    started = json.loads(stdout)
    assert started["steps"] == [{"shadow": 10.0, "canary": 0.0}, {"shadow": 0.0, "canary": 20.0}]
    assert started["baseline"] == 1 and started["candidate"] == 2 and started["state"] == "running"
    code, _, stderr = invoke("start", "support@v2", *FORCE)
    assert code == 4 and f"rollout #{started['id']}" in stderr  # one at a time, named

    assert invoke("abort", "support", "--reason", "again, with the policy")[0] == 0
    code, stdout, _ = invoke("start", "support@v2", "--canary", "20", "--policy", "default", *FORCE, "--json")
    steps = [RolloutStep.model_validate(s) for s in json.loads(stdout)["steps"]]
    assert steps == [RolloutStep(canary=20), RolloutStep(canary=25), RolloutStep(canary=100)]
    code, _, stderr = invoke("start", "support@v2", "--policy", "nope", *FORCE)
    assert code == 2 and "no rollout policy named 'nope'" in stderr


def test_status_shows_each_guard_with_its_interval_and_verdict(reg: Registry) -> None:
    rollout = reg.start_rollout("support", 2, steps=[RolloutStep(canary=50)], force=True, reason=FORCE[2])
    prod, cand = Tally(requests=400, answered=400, json_ok=396), Tally(requests=400, errors=0, answered=400)
    cand.json_ok = 200  # half of the candidate's answers are not JSON
    for t in (prod, cand):
        t.latency[Tally.bucket(0.2)] = t.requests
    reg.put_tallies(rollout, holder="gw-1", step=0, tallies={"production": prod, "candidate": cand})

    code, stdout, _ = invoke("status", "support")
    assert code == 0, stdout
    assert "v1 (production) -> v2" in stdout and "canary 50%" in stdout
    for shown in ("error_rate", "format_invalid", "truncated", "negative_feedback", "latency p99"):
        assert shown in stdout
    assert "fail" in stdout and "now: rollback: format_invalid" in stdout

    code, stdout, _ = invoke("status", "support", "--json")
    data = json.loads(stdout)
    guards = {g["name"]: g for g in data["now"]["figures"]["guards"]}
    assert guards["format_invalid"]["verdict"] == "fail" and guards["format_invalid"]["interval"][0] > 0.05
    assert guards["error_rate"]["verdict"] == "pass" and data["now"]["action"] == "rollback"
    assert data["now"]["figures"]["candidate"]["requests"] == 400


def test_pause_resume_abort_and_errors_that_change_nothing(reg: Registry, tmp_path: Path) -> None:
    reg.start_rollout("support", 2, steps=[RolloutStep(canary=20)], force=True, reason=FORCE[2])
    code, stdout, _ = invoke("pause", "support", "--json")
    assert code == 0 and json.loads(stdout)["state"] == "paused"
    code, _, stderr = invoke("resume", "support", "--to", "10")
    assert code == 2 and "--to 10" in stderr and reg.rollout("support").state == "paused"  # type: ignore[union-attr]
    code, stdout, _ = invoke("resume", "support", "--to", "100", "--json")
    data = json.loads(stdout)
    assert code == 0 and data["state"] == "running" and data["steps"][-1]["canary"] == 100.0
    code, _, stderr = invoke("status", "support@v2")
    assert code == 2 and "write support" in stderr
    # The installed script, as a user runs it: abort, then the status of the ended rollout.
    done = run_loraflow("adapters", "rollout", "abort", "support", "--reason", "wrong data", cwd=Path.cwd())
    assert done.returncode == 0 and "aborted; production stays v1" in done.stdout, done.stderr
    shown = run_loraflow("adapters", "rollout", "status", "support", cwd=Path.cwd())
    assert shown.returncode == 0 and "aborted" in shown.stdout and "Traceback" not in shown.stderr
    assert reg.get("support").aliases["production"] == 1
    missing = run_loraflow("adapters", "rollout", "status", "billing", cwd=Path.cwd())
    assert (
        missing.returncode == 3 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
    )
