"""The rollout's rules (registry/rollouts.py): always-valid intervals and the decisions they make."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from loraflow.registry.domain import RolloutInfo, RolloutStep
from loraflow.registry.rollouts import Tally, always_valid_difference, decide
from loraflow.registry.settings import RolloutPolicy

pytestmark = pytest.mark.unit

T0 = datetime(2026, 12, 1, tzinfo=UTC)
POLICY = RolloutPolicy(min_requests=100, min_seconds=30)


def rollout(steps: list[RolloutStep], step: int = 0) -> RolloutInfo:
    return RolloutInfo(
        id=1,
        adapter="support",
        candidate=2,
        baseline=1,
        policy="default",
        steps=steps,
        step=step,
        state="running",
        seq=1,
        decisions=[],
        started_at=T0,
        step_started_at=T0,
        created_by="t",
        created_at=T0,
    )


CANARY = rollout([RolloutStep(canary=20), RolloutStep(canary=100)])


def tally(n: int, *, errors: int = 0, invalid: int = 0, latency_s: float = 0.1) -> Tally:
    t = Tally(requests=n, errors=errors, answered=n - errors, json_ok=n - errors - invalid)
    t.latency[Tally.bucket(latency_s)] = n - errors
    return t


def test_the_always_valid_interval_holds_under_continuous_monitoring() -> None:
    """Equal error rates, looked at after every request up to 1,000: the always-valid interval
    excludes the true difference (0) in at most about 5% of runs over the whole run; a fixed-n 95%
    Wald interval looked at the same way does so far more often. This is why the guards use it."""
    rng = random.Random(7)
    runs, looks, p = 200, 1000, 0.1
    av_wrong = wald_wrong = 0
    for _ in range(runs):
        bad_c = bad_b = 0
        av_hit = wald_hit = False
        for n in range(1, looks + 1):
            bad_c += rng.random() < p
            bad_b += rng.random() < p
            if n < 20:
                continue
            found = always_valid_difference(bad_c, n, bad_b, n, confidence=0.95, scale=0.05)
            assert found is not None
            _, lower, upper = found
            av_hit = av_hit or lower > 0 or upper < 0
            pc, pb = bad_c / n, bad_b / n
            se = math.sqrt(max(pc * (1 - pc) + pb * (1 - pb), 1e-12) / n)
            wald_hit = wald_hit or abs(pc - pb) > 1.96 * se
        av_wrong += av_hit
        wald_wrong += wald_hit
    assert av_wrong / runs <= 0.06
    assert wald_wrong / runs >= 0.2  # re-checked fixed-n intervals: wrong far more often


def test_a_good_canary_advances_once_its_minimums_are_met() -> None:
    early = decide(
        CANARY,
        {"production": tally(400), "candidate": tally(60)},
        POLICY,
        now=T0 + timedelta(seconds=60),
        format_gated=True,
    )
    assert early.action == "wait" and "60 of 100 requests" in early.reason
    young = decide(
        CANARY,
        {"production": tally(400), "candidate": tally(150)},
        POLICY,
        now=T0 + timedelta(seconds=10),
        format_gated=True,
    )
    assert young.action == "wait" and "10 of 30 s" in young.reason
    ready = decide(
        CANARY,
        {"production": tally(2000), "candidate": tally(500)},
        POLICY,
        now=T0 + timedelta(seconds=60),
        format_gated=True,
    )
    assert ready.action == "advance", ready.reason
    assert {g["name"]: g["verdict"] for g in ready.figures["guards"]} == {
        "error_rate": "pass",
        "format_invalid": "pass",
        "truncated": "pass",
        "negative_feedback": "insufficient",  # nobody rated the canary: it does not hold the step back
    }
    rated = tally(500)
    rated.rated, rated.negative = 40, 30  # users dislike the canary's answers
    prod = tally(2000)
    prod.rated, prod.negative = 300, 15
    worse = decide(CANARY, {"production": prod, "candidate": rated}, POLICY, now=T0, format_gated=True)
    assert worse.action == "rollback" and worse.reason.startswith("negative_feedback:")


def test_a_canary_that_answers_errors_is_rolled_back_within_a_few_dozen_requests() -> None:
    """Every third canary request fails: the always-valid interval clears the 2-point margin early."""
    prod = tally(2000, errors=10)
    for n in range(1, 200):
        decision = decide(
            CANARY,
            {"production": prod, "candidate": tally(n, errors=n // 3)},
            POLICY,
            now=T0,
            format_gated=True,
        )
        if decision.action == "rollback":
            break
    assert decision.action == "rollback" and n <= 60
    assert decision.reason.startswith("error_rate:") and "above the margin 0.02" in decision.reason
    assert decision.figures["guards"][0]["verdict"] == "fail"


def test_invalid_json_rolls_back_when_the_task_answers_json_and_not_otherwise() -> None:
    tallies = {"production": tally(1000, invalid=5), "candidate": tally(200, invalid=60)}
    assert decide(CANARY, tallies, POLICY, now=T0, format_gated=True).action == "rollback"
    assert (
        decide(CANARY, tallies, POLICY, now=T0 + timedelta(hours=1), format_gated=False).action != "rollback"
    )


def test_a_slow_canary_is_rolled_back_at_the_end_of_its_step() -> None:
    tallies = {"production": tally(2000, latency_s=0.1), "candidate": tally(500, latency_s=0.5)}
    decision = decide(CANARY, tallies, POLICY, now=T0 + timedelta(seconds=60), format_gated=True)
    assert decision.action == "rollback" and decision.reason.startswith("latency:")


def test_milliseconds_of_scheduling_noise_are_not_a_slow_canary() -> None:
    """3 ms against 20 ms is a ratio of 7 but 17 ms of difference: under p99_latency_slack_s."""
    tallies = {"production": tally(2000, latency_s=0.003), "candidate": tally(500, latency_s=0.02)}
    assert (
        decide(CANARY, tallies, POLICY, now=T0 + timedelta(seconds=60), format_gated=True).action == "advance"
    )
    slow = {"production": tally(2000, latency_s=0.003), "candidate": tally(500, latency_s=0.2)}
    assert (
        decide(CANARY, slow, POLICY, now=T0 + timedelta(seconds=60), format_gated=True).action == "rollback"
    )


def test_answers_cut_off_at_max_tokens_roll_back_like_the_evals_stopped_scorer() -> None:
    cut = tally(500)
    cut.truncated = 100  # one answer in five hits max_tokens; production's never do
    decision = decide(
        CANARY, {"production": tally(2000), "candidate": cut}, POLICY, now=T0, format_gated=False
    )
    assert decision.action == "rollback" and decision.reason.startswith("truncated")
    assert decision.figures["candidate"]["truncated_rate"] == 0.2


def test_a_last_step_below_100_holds_and_a_shadow_step_is_judged_on_shadow_answers() -> None:
    held = rollout([RolloutStep(canary=20)])
    tallies = {"production": tally(2000), "candidate": tally(500)}
    assert decide(held, tallies, POLICY, now=T0 + timedelta(seconds=60), format_gated=True).action == "hold"
    shadow = rollout([RolloutStep(shadow=50), RolloutStep(canary=100)])
    by_shadow = {"production": tally(2000), "shadow": tally(500, errors=200), "candidate": tally(0)}
    decision = decide(shadow, by_shadow, POLICY, now=T0, format_gated=True)
    assert decision.action == "rollback" and decision.figures["arm"] == "shadow"
    assert [g["name"] for g in decision.figures["guards"]] == [
        "error_rate",
        "format_invalid",
        "truncated",
    ]  # no ratings in shadow


def test_histograms_of_gateways_add_up() -> None:
    a, b = tally(10, latency_s=0.01), tally(990, latency_s=1.0)
    a.add(b)
    assert a.requests == 1000 and Tally.quantile(a.latency, 0.5) == pytest.approx(1.0, rel=0.2)
    assert Tally.from_json(a.to_json()) == a
