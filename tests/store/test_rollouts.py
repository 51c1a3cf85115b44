"""Rollouts in the registry (SQLite, and PostgreSQL when given): their state, the compare-and-swap of
each move, the controller lease, and the aliases they hold while they run."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraflow.registry.domain import RolloutStep
from loraflow.registry.errors import ConflictError, GateRefusedError, InvalidArgumentError, NotFoundError
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from tests.factories import FORCED, gate_report, make_adapter

pytestmark = pytest.mark.store

STEPS = [RolloutStep(shadow=10), RolloutStep(canary=20), RolloutStep(canary=100)]


@pytest.fixture
def reg(db_url: str, tmp_path: Path, base_dir: Path) -> Iterator[Registry]:
    """support@v1 in production, v2 with a passing eval report against it, v3 with none."""
    r = Registry.open(Settings(home=tmp_path / "home", database_url=db_url))
    for seed in (1, 2, 3):
        r.register("support", make_adapter(tmp_path / f"a{seed}", seed=seed), base_model=str(base_dir))
    r.promote("support", 1, force=True, reason=FORCED)
    r.record_evaluation(
        "support",
        2,
        dataset=None,
        split="test",
        split_digest="d" * 64,
        production_version=1,
        report=gate_report(2, production=1, gain_prod=(0.1, 0.05, 0.15)),
    )
    yield r
    r.close()


def test_a_rollout_walks_its_steps_and_promotes_at_the_end(reg: Registry) -> None:
    started = reg.start_rollout("support", 2, steps=STEPS)
    assert (started.baseline, started.candidate, started.step, started.state) == (1, 2, 0, "running")
    assert started.current == RolloutStep(shadow=10) and started.seq == 1
    assert started.decisions[0].action == "start" and started.decisions[0].figures["gate"]["passed"]
    assert reg.rollout("support") == started and reg.rollouts() == [started]

    first = reg.advance_rollout("support", expect_seq=1, figures={"requests": 200})
    assert (first.step, first.seq, first.current) == (1, 2, RolloutStep(canary=20))
    assert first.step_started_at >= started.step_started_at
    assert reg.get("support").aliases["production"] == 1  # a canary is not a promotion

    second = reg.advance_rollout("support", expect_seq=2)
    done = reg.advance_rollout("support", expect_seq=second.seq, figures={"requests": 900})
    assert done.state == "succeeded" and done.ended_at is not None and not done.active
    assert reg.get("support").aliases["production"] == 2
    assert reg.rollout("support") is None and reg.rollouts() == []
    history = reg.history("support")
    assert (history.moves[-1].from_version, history.moves[-1].to_version) == (1, 2)
    actions = [e.action for e in history.events if e.action.startswith(("rollout.", "alias."))]
    assert actions[-5:] == [
        "rollout.start",
        "rollout.advance",
        "rollout.advance",
        "alias.promote",
        "rollout.succeed",
    ]
    assert history.events[-2].after["rollout"] == done.id  # the promotion names its rollout
    assert history.events[-1].after["figures"] == {"requests": 900}


def test_while_a_rollout_runs_its_adapter_aliases_and_versions_stay_put(reg: Registry) -> None:
    reg.promote("support", 3, alias="staging")
    rollout = reg.start_rollout("support", 2, steps=STEPS)
    revision = reg.revision()
    for attempt in (
        lambda: reg.promote("support", 3, alias="staging", expect=None),
        lambda: reg.promote("support", 2, force=True, reason="x"),
        lambda: reg.rollback("support"),
        lambda: reg.delete_alias("support", "staging"),
        lambda: reg.archive("support", 3),
    ):
        with pytest.raises(ConflictError, match=f"in rollout #{rollout.id} .*rollout abort support"):
            attempt()
    with pytest.raises(ConflictError, match="already in rollout"):
        reg.start_rollout("support", 3, steps=STEPS, force=True, reason="x")
    assert reg.revision() == revision  # nothing changed

    ended = reg.abort_rollout("support", reason="testing")
    assert ended.state == "aborted" and ended.decisions[-1].reason == "testing"
    assert reg.get("support").aliases == {"production": 1, "staging": 3}  # production unchanged
    assert reg.archive("support", 2).status == "archived"  # free again once it ended


def test_a_rollback_ends_it_with_production_unchanged(reg: Registry) -> None:
    rollout = reg.start_rollout("support", 2, steps=STEPS)
    reg.advance_rollout("support", expect_seq=rollout.seq)
    ended = reg.roll_back_rollout(
        "support", reason="error rate", expect_seq=rollout.seq + 1, figures={"error_rate": {"lower": 0.04}}
    )
    assert (ended.state, ended.step) == ("rolled_back", 1)
    assert ended.decisions[-1].figures == {"error_rate": {"lower": 0.04}}
    assert reg.get("support").aliases["production"] == 1
    event = reg.history("support").events[-1]
    assert event.action == "rollout.rollback" and event.after["reason"] == "error rate"
    with pytest.raises(NotFoundError, match="no rollout running"):
        reg.advance_rollout("support")
    assert [r.state for r in reg.rollouts("support")] == ["rolled_back"]


def test_every_move_is_compare_and_swap(reg: Registry) -> None:
    rollout = reg.start_rollout("support", 2, steps=STEPS)
    reg.pause_rollout("support")  # an operator acted after the controller read the rollout
    revision = reg.revision()
    with pytest.raises(ConflictError, match="changed since it was read"):
        reg.advance_rollout("support", expect_seq=rollout.seq)
    with pytest.raises(ConflictError, match="changed since it was read"):
        reg.roll_back_rollout("support", reason="late", expect_seq=rollout.seq)
    assert reg.revision() == revision
    paused = reg.rollout("support")
    assert paused is not None and paused.state == "paused"
    with pytest.raises(ConflictError, match="paused"):
        reg.advance_rollout("support", expect_seq=paused.seq)
    assert reg.resume_rollout("support").state == "running"


def test_two_controllers_racing_advance_it_once(reg: Registry) -> None:
    rollout = reg.start_rollout("support", 2, steps=STEPS)
    results: list[object] = []

    def advance() -> None:
        try:
            results.append(reg.advance_rollout("support", expect_seq=rollout.seq).step)
        except ConflictError as exc:
            results.append(exc)

    threads = [threading.Thread(target=advance) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r for r in results if isinstance(r, int)) == [1]
    assert reg.rollout("support").step == 1  # type: ignore[union-attr]


def test_a_held_rollout_goes_further_only_when_asked(reg: Registry) -> None:
    held = reg.start_rollout("support", 2, steps=[RolloutStep(canary=20)])
    with pytest.raises(ConflictError, match=r"held at its last step .*--to 100"):
        reg.advance_rollout("support", expect_seq=held.seq)
    with pytest.raises(InvalidArgumentError, match="already goes to canary 20"):
        reg.resume_rollout("support", to=10)
    resumed = reg.resume_rollout("support", to=100)
    assert resumed.steps == [RolloutStep(canary=20), RolloutStep(canary=100)] and resumed.step == 0
    assert reg.advance_rollout("support", expect_seq=resumed.seq).current == RolloutStep(canary=100)
    assert reg.advance_rollout("support").state == "succeeded"
    assert reg.get("support").aliases["production"] == 2


def test_starting_checks_the_offline_gate_and_the_state(reg: Registry) -> None:
    revision = reg.revision()
    with pytest.raises(GateRefusedError):
        reg.start_rollout("support", 3)  # no eval report
    with pytest.raises(InvalidArgumentError, match="--force needs --reason"):
        reg.start_rollout("support", 3, force=True)
    with pytest.raises(InvalidArgumentError, match="no rollout policy named 'fast'; policies: default"):
        reg.start_rollout("support", 2, policy="fast")
    with pytest.raises(ConflictError, match="already points at v1"):
        reg.start_rollout("support", 1, force=True, reason="x")
    assert reg.revision() == revision
    forced = reg.start_rollout("support", 3, force=True, reason="hotfix")
    assert forced.steps == Settings().rollout.policies["default"].steps  # the default policy's steps
    start = forced.decisions[0].figures
    assert start["forced"] and start["reason"] == "hotfix" and not start["gate"]["passed"]


def test_a_rollout_needs_a_production_version(db_url: str, tmp_path: Path, base_dir: Path) -> None:
    reg = Registry.open(Settings(home=tmp_path / "home", database_url=db_url))
    reg.register("fresh", make_adapter(tmp_path / "a", seed=1), base_model=str(base_dir))
    with pytest.raises(ConflictError, match="no production version to compare fresh@v1 with"):
        reg.start_rollout("fresh", 1, force=True, reason="x")
    reg.close()


def test_one_controller_holds_the_lease_until_it_lapses(reg: Registry) -> None:
    rollout = reg.start_rollout("support", 2, steps=STEPS)
    revision = reg.revision()
    assert reg.claim_rollout(rollout, holder="gw-a", ttl_s=0.5)
    assert not reg.claim_rollout(rollout, holder="gw-b", ttl_s=0.5)
    assert reg.claim_rollout(rollout, holder="gw-a", ttl_s=0.5)  # renewing
    assert reg.revision() == revision  # leasing moves no routing
    time.sleep(0.7)  # gw-a died: its lease lapses
    assert reg.claim_rollout(rollout, holder="gw-b", ttl_s=5)
    assert reg.rollout("support").controller == "gw-b"  # type: ignore[union-attr]
    reg.abort_rollout("support")
    assert not reg.claim_rollout(rollout, holder="gw-b", ttl_s=5)  # an ended rollout has no controller


def test_tallies_of_several_gateways_add_up_per_step_and_arm(reg: Registry) -> None:
    from loraflow.registry.rollouts import Tally

    rollout = reg.start_rollout("support", 2, steps=STEPS)
    revision = reg.revision()
    reg.put_tallies(
        rollout, holder="gw-a", step=0, tallies={"production": Tally(requests=5), "shadow": Tally(requests=1)}
    )
    reg.put_tallies(
        rollout, holder="gw-a", step=0, tallies={"production": Tally(requests=9, errors=1)}
    )  # rewritten whole
    reg.put_tallies(rollout, holder="gw-b", step=0, tallies={"production": Tally(requests=3)})
    reg.put_tallies(
        rollout, holder="gw-b", step=1, tallies={"candidate": Tally(requests=100)}
    )  # another step
    seen = reg.tallies(rollout)
    assert (seen["production"].requests, seen["production"].errors) == (12, 1)
    assert seen["shadow"].requests == 1 and seen["candidate"].requests == 0
    assert reg.revision() == revision  # counting moves no routing
    assert reg.tallies(reg.advance_rollout("support"))["candidate"].requests == 100


def test_at_canary_100_production_is_the_window_before_with_its_stragglers(reg: Registry) -> None:
    from loraflow.registry.rollouts import Tally

    rollout = reg.start_rollout("support", 2, steps=[RolloutStep(canary=50), RolloutStep(canary=100)])
    reg.put_tallies(rollout, holder="gw", step=0, tallies={"production": Tally(requests=40, rated=20)})
    at_100 = reg.advance_rollout("support")
    # One production request of step 1 ended after the move: it joins step 1's window, not replaces it.
    reg.put_tallies(
        at_100,
        holder="gw",
        step=1,
        tallies={"production": Tally(requests=1), "candidate": Tally(requests=30)},
    )
    seen = reg.tallies(at_100)
    assert (seen["production"].requests, seen["production"].rated, seen["candidate"].requests) == (41, 20, 30)


CRASH = """
import os, sys
from pathlib import Path
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.registry.store import MetadataStore

home, url = sys.argv[1], sys.argv[2]
decide = MetadataStore._decide

def crash(self, tx, row, adapter, action, **kw):
    if action == "succeed":  # production has moved in this transaction; it never commits
        os._exit(9)
    return decide(self, tx, row, adapter, action, **kw)

MetadataStore._decide = crash
reg = Registry.open(Settings(home=Path(home), database_url=url))
r = reg.rollout("support")
reg.advance_rollout("support", expect_seq=r.seq)
"""


def test_a_controller_that_dies_mid_move_leaves_production_and_the_rollout_as_they_were(
    reg: Registry, tmp_path: Path
) -> None:
    import subprocess
    import sys

    reg.start_rollout("support", 2, steps=[RolloutStep(canary=50), RolloutStep(canary=100)])
    at_last = reg.advance_rollout("support", expect_seq=1)
    revision = reg.revision()
    url = reg.settings.resolved_database_url
    done = subprocess.run(
        [sys.executable, "-c", CRASH, str(reg.settings.home), url], capture_output=True, timeout=120
    )
    assert done.returncode == 9, done.stderr.decode()[-2000:]  # it died inside the transaction
    after = reg.rollout("support")
    assert after == at_last  # still at its last step, same seq: nothing of the move was kept
    assert reg.get("support").aliases["production"] == 1 and reg.revision() == revision
    assert not [e for e in reg.history("support").events if e.action == "rollout.succeed"]
    done_now = reg.advance_rollout("support", expect_seq=at_last.seq)  # another controller goes on
    assert done_now.state == "succeeded" and reg.get("support").aliases["production"] == 2
