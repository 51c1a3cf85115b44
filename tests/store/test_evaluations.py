"""Eval reports on versions, and the promotion gate that reads them (SQLite, and PostgreSQL when given)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loraflow.cli.main import app as loraflow_app
from loraflow.registry.errors import ConflictError, GateRefusedError, InvalidArgumentError
from loraflow.registry.service import Registry
from loraflow.registry.settings import GateSettings, Settings
from tests.factories import gate_report as report
from tests.factories import make_adapter

pytestmark = pytest.mark.store


@pytest.fixture
def reg(db_url: str, tmp_path: Path, base_dir: Path) -> Iterator[Registry]:
    r = Registry.open(Settings(home=tmp_path / "home", database_url=db_url))
    for seed in (1, 2, 3):
        r.register("support", make_adapter(tmp_path / f"a{seed}", seed=seed), base_model=str(base_dir))
    yield r
    r.close()


def record(reg: Registry, version: int, rep: dict[str, Any]) -> int:
    production = reg.get("support").aliases.get("production")
    return reg.record_evaluation(
        "support",
        version,
        dataset=None,
        split="test",
        split_digest="d" * 64,
        production_version=production,
        report=rep,
    ).id


def test_report_round_trips_and_is_audited(reg: Registry) -> None:
    rep = report(1, production=None) | {"examples": [{"prompt": "é ✓ <b>", "outputs": {}}], "n": 1}
    first = record(reg, 1, rep)
    second = record(reg, 1, report(1, production=None, json_valid=0.5))
    stored = reg.evaluations("support", 1)
    assert [e.id for e in stored] == [first, second]
    assert stored[0].report == json.loads(json.dumps(rep))  # exactly what was stored, unicode included
    assert stored[0].split == "test" and stored[0].split_digest == "d" * 64
    assert stored[0].production_version is None and stored[0].ref == "support@v1"
    assert reg.evaluations("support", 2) == [] and len(reg.evaluations("support")) == 2
    events = [e for e in reg.history("support").events if e.action == "version.evaluate"]
    assert [e.after["evaluation"] for e in events if e.after] == [first, second]
    assert reg.get_version("support", 1).eval_report is None  # the version row is unchanged


def test_gate_refuses_without_a_report_and_force_needs_a_reason(reg: Registry) -> None:
    before = reg.revision()
    with pytest.raises(GateRefusedError) as info:
        reg.promote("support", 1)
    assert "no eval report" in info.value.message and "loraflow eval support@v1" in info.value.message
    with pytest.raises(InvalidArgumentError) as bad:
        reg.promote("support", 1, force=True)
    assert bad.value.param == "reason"
    with pytest.raises(InvalidArgumentError):
        reg.promote("support", 1, reason="why not")
    assert reg.revision() == before  # nothing changed
    reg.promote("support", 1, force=True, reason="hotfix: customer outage")
    event = reg.history("support").events[-1]
    assert event.action == "alias.promote" and event.after is not None
    assert event.after["forced"] is True and event.after["reason"] == "hotfix: customer outage"
    assert event.after["gate"]["passed"] is False and event.after["gate"]["rules"][0]["rule"] == "report"
    # An ungated alias needs no report.
    reg.promote("support", 2, alias="staging")


def test_gate_passes_a_winner_and_refuses_a_loser_by_how_much(reg: Registry) -> None:
    record(reg, 1, report(1, production=None))
    move = reg.promote("support", 1)
    assert move.to_version == 1
    event = reg.history("support").events[-1]
    assert event.after is not None and event.after["gate"]["passed"] is True and "forced" not in event.after

    # v2 is worse than production: refused, naming the rule and the shortfall.
    record(reg, 2, report(2, production=1, gain_prod=(-0.5, -0.7, -0.3)))
    with pytest.raises(GateRefusedError) as info:
        reg.promote("support", 2)
    message = info.value.message
    assert "beats_production" in message and "-0.5" in message and "short by 0.7" in message
    assert reg.get("support").aliases == {"production": 1}

    # v3 wins on the task but forgets general ability and breaks JSON.
    record(reg, 3, report(3, production=1, gain_prod=(0.2, 0.1, 0.3), regression_diff=-0.1, json_valid=0.9))
    decision = reg.gate("support", 3)
    failed = {r.rule: r for r in decision.failed}
    assert set(failed) == {"regression", "json_valid"}
    assert failed["regression"].shortfall == pytest.approx(0.08)
    assert failed["json_valid"].shortfall == pytest.approx(0.09)


def test_each_lm_eval_task_is_gated_like_the_builtin_suite_in_its_own_direction(reg: Registry) -> None:
    def task(name: str, diff: float, *, higher: bool) -> dict[str, Any]:
        return {
            "suite": f"lm-eval:{name}",
            "metric": "m,none",
            "higher_is_better": higher,
            "comparisons": {"base": {"diff": diff, "ci": None}},
        }

    rep = report(1, production=None) | {
        "lm_eval": {
            "tasks": [
                task("kept", -0.01, higher=True),  # within max_regression_drop (0.02)
                task("forgot", -0.3, higher=True),
                task("perplexity", +0.5, higher=False),  # up is worse when lower is better
                task("improved", -0.5, higher=False),
            ]
        }
    }
    record(reg, 1, rep)
    decision = reg.gate("support", 1)
    regression = [r for r in decision.rules if r.rule == "regression"]
    assert len(regression) == 5  # the built-in suite, then each task
    failed = [r for r in regression if not r.passed]
    assert ["lm-eval:forgot" in failed[0].detail, "lm-eval:perplexity" in failed[1].detail] == [True, True]
    assert [r.shortfall for r in failed] == [pytest.approx(0.28), pytest.approx(0.48)]
    with pytest.raises(GateRefusedError) as info:
        reg.promote("support", 1)
    assert "lm-eval:forgot suite moved -0.3 against base" in info.value.message


def test_a_gain_inside_the_noise_is_not_a_win(reg: Registry) -> None:
    record(reg, 1, report(1, production=None, gain_base=(0.05, -0.02, 0.12)))
    with pytest.raises(GateRefusedError) as info:
        reg.promote("support", 1)
    assert "beats_base" in info.value.message and "lower bound above 0" in info.value.message


def test_a_report_made_against_another_production_is_stale(reg: Registry) -> None:
    reg.promote("support", 1, force=True, reason="bootstrap")
    record(reg, 3, report(3, production=1, gain_prod=(0.3, 0.2, 0.4)))
    reg.promote("support", 2, force=True, reason="someone else shipped v2")
    with pytest.raises(GateRefusedError) as info:
        reg.promote("support", 3)
    assert "stale" in info.value.message and "v1" in info.value.message and "v2" in info.value.message


def test_a_passing_promote_pins_the_production_it_was_judged_against(reg: Registry) -> None:
    reg.promote("support", 1, force=True, reason="bootstrap")
    record(reg, 2, report(2, production=1, gain_prod=(0.3, 0.2, 0.4)))
    with pytest.raises(ConflictError):  # an explicit --expect that disagrees still wins
        reg.promote("support", 2, expect=3)
    assert reg.promote("support", 2).from_version == 1


def test_policy_per_adapter_from_config(db_url: str, tmp_path: Path, base_dir: Path) -> None:
    gate = GateSettings(adapters={"support": {"min_gain_over_base": 0.9}})
    r = Registry.open(Settings(home=tmp_path / "home", database_url=db_url, gate=gate))
    try:
        r.register("support", make_adapter(tmp_path / "a1", seed=1), base_model=str(base_dir))
        record(r, 1, report(1, production=None))  # gain 0.8 < 0.9
        assert not r.gate("support", 1).passed
        r.register("other", make_adapter(tmp_path / "a2", seed=2), base_model=str(base_dir))
        r.record_evaluation(
            "other",
            1,
            dataset=None,
            split="test",
            split_digest="d" * 64,
            production_version=None,
            report=report(1, production=None),
        )
        assert r.gate("other", 1).passed  # the default policy
    finally:
        r.close()


def test_cli_promote_exit_code_4_names_the_rule(reg: Registry, isolated_env: Path, db_url: str) -> None:
    record(reg, 1, report(1, production=None, gain_base=(-0.1, -0.2, 0.0)))
    env = {"LORAFLOW_HOME": str(reg.settings.home), "LORAFLOW_DATABASE_URL": db_url}
    runner = CliRunner()
    done = runner.invoke(loraflow_app, ["adapters", "promote", "support", "v1"], env=env)
    assert done.exit_code == 4
    assert "beats_base" in done.output and "short by" in done.output
    done = runner.invoke(
        loraflow_app, ["adapters", "promote", "support", "v1", "--force", "--reason", "demo"], env=env
    )
    assert done.exit_code == 0, done.output
    assert "forced past the gate: demo" in done.output


def test_a_gated_first_promotion_is_a_compare_and_swap_on_no_production(
    reg: Registry, db_url: str, tmp_path: Path
) -> None:
    """Two gated promotes racing to be the first production: each report was judged against no
    production, so the one that moves second must be refused, not replace the first."""
    record(reg, 1, report(1, production=None))
    record(reg, 2, report(2, production=None))
    other = Registry.open(Settings(home=tmp_path / "home", database_url=db_url))
    try:
        set_alias = reg.store.set_alias

        def after_the_other_moved_first(**kw: Any) -> Any:
            # The interleaving a race produces: this promote judged the gate with no production,
            # and the other promote commits before this one reaches the store.
            other.promote("support", 2)
            return set_alias(**kw)

        reg.store.set_alias = after_the_other_moved_first  # type: ignore[method-assign]
        with pytest.raises(ConflictError) as info:
            reg.promote("support", 1)
    finally:
        other.close()
    assert info.value.param == "expect" and "points at v2, not nothing" in info.value.message
    assert reg.get("support").aliases == {"production": 2}
    assert [(m.from_version, m.to_version) for m in reg.history("support").moves] == [(None, 2)]
