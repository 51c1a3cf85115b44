"""The rules of a rollout: what the live figures of candidate and production are, and what they
decide. Pure functions over counts, like ``gate.py``: the gateways' controller acts on them and
``adapters rollout status`` shows them, so both read the same verdicts.

The figures are checked continuously (every few seconds, for as long as a step lasts), so a
fixed-n interval re-checked each time would be wrong: it crosses any margin by chance sooner or
later. The rates are compared with an *always-valid* interval instead, the normal-mixture
sequential test of Johari et al., "Always valid inference" (mSPRT): at every n at once, the
difference of two rates lies in it with the stated confidence. Latency gets a plain guard once a
step's minimums are met (the candidate's p99 against production's, over the step's window, with a
ratio and an absolute slack); it is not a sequential test. The other figures are reported and not
gated.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from loraflow.registry.domain import RolloutInfo
from loraflow.registry.settings import RolloutPolicy

Arm = Literal["production", "candidate", "shadow"]
ARMS: tuple[Arm, ...] = ("production", "candidate", "shadow")
# pass/fail: within/beyond the margin with confidence; pending: not yet conclusive (blocks advancing);
# insufficient: too few observations to gate on (negative feedback with fewer than min_ratings).
Verdict = Literal["pass", "fail", "pending", "insufficient"]

# Latency histogram: log-spaced bucket upper edges from 5 ms to about 10 minutes. Histograms of
# several gateways add up; quantiles of them would not.
LATENCY_EDGES: tuple[float, ...] = tuple(0.005 * 1.2**i for i in range(65))

# A baseline whose training answers are at least this much JSON has its candidates' format gated.
JSON_FORMAT_SHARE = 0.5

# Counters a tally holds (each a count of requests), besides the latency histograms.
COUNTS = ("requests", "errors", "answered", "json_ok", "refusals", "truncated", "agreed", "rated", "negative")


def split_point(rollout_id: int, key: str) -> float:
    """Where ``key`` falls in [0, 100) for rollout ``rollout_id``: a request whose point is below the
    canary's weight goes to the candidate. The same on every gateway (a hash, no state), sticky for
    a key (an end user's ``user``), and salted by the rollout, so each rollout picks other users."""
    digest = hashlib.sha256(f"{rollout_id}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


@dataclass
class Tally:
    """What one arm of one rollout step saw: counts, and latency/TTFT histograms (seconds)."""

    requests: int = 0
    errors: int = 0  # answered with a 5xx, or broken mid-stream
    answered: int = 0  # answered in full (what format validity and refusals are over)
    json_ok: int = 0
    refusals: int = 0
    truncated: int = 0  # answers cut off at max_tokens (finish_reason "length"): the eval's `stopped`
    agreed: int = 0  # shadow answers identical to production's answer to the same request
    rated: int = 0
    negative: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES) + 1))
    ttft: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES) + 1))

    def add(self, other: Tally) -> None:
        for name in COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latency = [a + b for a, b in zip(self.latency, other.latency, strict=True)]
        self.ttft = [a + b for a, b in zip(self.ttft, other.ttft, strict=True)]

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COUNTS} | {"latency": self.latency, "ttft": self.ttft}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Tally:
        tally = cls()
        for name in COUNTS:
            setattr(tally, name, int(data.get(name) or 0))
        for name in ("latency", "ttft"):
            counts = list(data.get(name) or [])
            if len(counts) == len(LATENCY_EDGES) + 1:
                setattr(tally, name, [int(c) for c in counts])
        return tally

    @staticmethod
    def bucket(seconds: float) -> int:
        return bisect_left(LATENCY_EDGES, seconds)

    @staticmethod
    def quantile(histogram: list[int], q: float) -> float | None:
        """The upper edge of the bucket holding the ``q`` quantile (None: empty, or past the last)."""
        total = sum(histogram)
        if total == 0:
            return None
        seen = 0
        for i, count in enumerate(histogram):
            seen += count
            if seen >= q * total:
                return LATENCY_EDGES[i] if i < len(LATENCY_EDGES) else None
        return None


def format_gated(json_share: float | None) -> bool:
    """Whether the format guard applies: the baseline's training split is mostly JSON answers."""
    return json_share is not None and json_share >= JSON_FORMAT_SHARE


def summed(tallies: Iterable[Tally]) -> Tally:
    total = Tally()
    for tally in tallies:
        total.add(tally)
    return total


def always_valid_difference(
    bad_c: int, n_c: int, bad_b: int, n_b: int, *, confidence: float, scale: float
) -> tuple[float, float, float] | None:
    """(difference, lower, upper) of the candidate's rate minus the baseline's, an always-valid
    interval: mSPRT with a normal mixture of spread ``scale`` over the difference (Johari et al.,
    section 4). The variance uses each rate shrunk by one success and one failure (Agresti-Caffo),
    so an arm with no events still has some. None until both arms have a request."""
    if n_c == 0 or n_b == 0:
        return None
    p_c, p_b = bad_c / n_c, bad_b / n_b
    s_c, s_b = (bad_c + 1) / (n_c + 2), (bad_b + 1) / (n_b + 2)
    v = s_c * (1 - s_c) / n_c + s_b * (1 - s_b) / n_b
    tau2 = scale**2
    alpha = 1 - confidence
    half = math.sqrt(v * (v + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log((v + tau2) / v)))
    diff = p_c - p_b
    return diff, diff - half, diff + half


@dataclass(frozen=True)
class Guard:
    """One gated figure: the candidate's rate against production's, and what it says."""

    name: str
    candidate: float | None
    production: float | None
    n_candidate: int
    n_production: int
    interval: tuple[float, float] | None  # of candidate - production (a rate that is bad when high)
    margin: float
    verdict: Verdict

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "candidate": self.candidate,
            "production": self.production,
            "n": [self.n_candidate, self.n_production],
            "interval": list(self.interval) if self.interval else None,
            "margin": self.margin,
            "verdict": self.verdict,
        }


def rate_guard(
    name: str,
    bad_c: int,
    n_c: int,
    bad_b: int,
    n_b: int,
    *,
    margin: float,
    policy: RolloutPolicy,
    min_n: int = 0,
) -> Guard:
    """A rate that is bad when high (errors, invalid JSON, negative feedback): ``fail`` once the
    candidate is worse than production by more than ``margin`` with the policy's confidence,
    ``pass`` once it is within ``margin`` with that confidence, else ``pending`` (or
    ``insufficient`` while either side has fewer than ``min_n`` observations: nothing to compare)."""
    found = always_valid_difference(
        bad_c, n_c, bad_b, n_b, confidence=policy.confidence, scale=policy.effect_scale
    )
    few: Verdict = "insufficient" if min(n_c, n_b) < min_n else "pending"
    if found is None:
        return Guard(name, None, None, n_c, n_b, None, margin, few)
    _, lower, upper = found
    verdict: Verdict = "fail" if lower > margin else "pass" if upper <= margin else few
    return Guard(name, bad_c / n_c, bad_b / n_b, n_c, n_b, (lower, upper), margin, verdict)


@dataclass(frozen=True)
class Decision:
    """What the figures of a rollout's current step say to do."""

    action: Literal["advance", "rollback", "wait", "hold"]
    reason: str
    figures: dict[str, Any]


def figures_of(
    rollout: RolloutInfo, tallies: Mapping[Arm, Tally], policy: RolloutPolicy, *, format_gated: bool
) -> tuple[list[Guard], dict[str, Any]]:
    """The guards of the current step and every figure reported beside them."""
    step = rollout.current
    prod = tallies.get("production", Tally())
    cand = tallies.get("candidate" if step.canary else "shadow", Tally())

    def guard(
        name: str, bad: Callable[[Tally], int], n: Callable[[Tally], int], margin: float, min_n: int = 0
    ) -> Guard:
        """``name``'s rate (``bad`` of ``n``) for the candidate against production."""
        return rate_guard(
            name, bad(cand), n(cand), bad(prod), n(prod), margin=margin, policy=policy, min_n=min_n
        )

    guards = [guard("error_rate", lambda t: t.errors, lambda t: t.requests, policy.max_error_rate_increase)]
    if format_gated:
        invalid = guard(
            "format_invalid",
            lambda t: t.answered - t.json_ok,
            lambda t: t.answered,
            policy.max_format_invalid_increase,
        )
        guards.append(invalid)
    guards.append(
        guard("truncated", lambda t: t.truncated, lambda t: t.answered, policy.max_truncated_increase)
    )
    if step.canary:  # users see a canary's answers, so they can rate them; not a shadow's
        guards.append(
            guard(
                "negative_feedback",
                lambda t: t.negative,
                lambda t: t.rated,
                policy.max_negative_feedback_increase,
                min_n=policy.min_ratings,
            )
        )

    def arm(t: Tally) -> dict[str, Any]:
        return {
            "requests": t.requests,
            "error_rate": t.errors / t.requests if t.requests else None,
            "json_valid": t.json_ok / t.answered if t.answered else None,
            "refusal_rate": t.refusals / t.answered if t.answered else None,
            "truncated_rate": t.truncated / t.answered if t.answered else None,
            "negative_feedback": t.negative / t.rated if t.rated else None,
            "latency_p50_s": Tally.quantile(t.latency, 0.5),
            "latency_p99_s": Tally.quantile(t.latency, 0.99),
            "ttft_p50_s": Tally.quantile(t.ttft, 0.5),
            "ttft_p99_s": Tally.quantile(t.ttft, 0.99),
        }

    reported: dict[str, Any] = {
        "candidate": arm(cand),
        "production": arm(prod),
        "arm": "canary" if step.canary else "shadow",
    }
    if not step.canary:  # both answers of the same request: how often they are the same
        reported["agreement"] = cand.agreed / cand.answered if cand.answered else None
    return guards, reported


def decide(
    rollout: RolloutInfo,
    tallies: Mapping[Arm, Tally],
    policy: RolloutPolicy,
    *,
    now: datetime,
    format_gated: bool,
) -> Decision:
    """What to do with a running rollout now. Any guard's ``fail`` rolls back at once (the
    intervals are valid at every look). Advancing needs the step's minimum requests and time, every
    guard's ``pass``, and the candidate's p99 latency within ``max_p99_latency_ratio`` of
    production's over the step. A last step below canary 100% then holds."""
    guards, figures = figures_of(rollout, tallies, policy, format_gated=format_gated)
    figures = figures | {"guards": [g.to_json() for g in guards], "step": rollout.step}
    failed = [g for g in guards if g.verdict == "fail"]
    if failed:
        g = failed[0]
        low = g.interval[0] if g.interval else 0.0
        return Decision(
            "rollback",
            f"{g.name}: the candidate's {g.candidate:.3f} against production's {g.production:.3f} is worse "
            f"by at least {low:.3f} (always-valid {policy.confidence:.0%} interval), above the margin "
            f"{g.margin:g}",
            figures,
        )
    cand = figures["candidate"]
    seconds = (now - rollout.step_started_at).total_seconds()
    if cand["requests"] < policy.min_requests or seconds < policy.min_seconds:
        return Decision(
            "wait",
            f"{cand['requests']} of {policy.min_requests} requests, "
            f"{seconds:.0f} of {policy.min_seconds:g} s",
            figures,
        )
    p99_c, p99_p = cand["latency_p99_s"], figures["production"]["latency_p99_s"]
    slow = (
        p99_c is not None
        and p99_p is not None
        and p99_c > p99_p * policy.max_p99_latency_ratio
        and p99_c - p99_p > policy.p99_latency_slack_s
    )
    if figures["arm"] == "canary" and slow:
        return Decision(
            "rollback",
            f"latency: the candidate's p99 {p99_c:.3f} s is above {policy.max_p99_latency_ratio:g} x "
            f"production's {p99_p:.3f} s over the step",
            figures,
        )
    pending = [g.name for g in guards if g.verdict == "pending"]
    if pending:
        return Decision("wait", f"not yet conclusive: {', '.join(pending)}", figures)
    if rollout.last_step and rollout.current.canary < 100:
        return Decision("hold", f"held at {rollout.current}: every guard passes", figures)
    return Decision(
        "advance",
        f"every guard passes, on {cand['requests']} of the candidate's requests in {seconds:.0f} s",
        figures,
    )
