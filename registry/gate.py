"""The promotion gate: does a version's stored eval report earn it a gated alias?

Pure functions over an :class:`EvaluationInfo` and a :class:`GatePolicy`; the
:class:`~loraflow.registry.service.Registry` calls :func:`check` on every promote
to a gated alias and records the decision in the alias move's audit event.

Rules, each reported with how far the version is from passing:

- ``report``: there is an eval report (``loraflow eval NAME@vN``)
- ``fresh``: it was made against the version production points at now
- ``primary_metric``: the report has the policy's primary metric
- ``beats_base``: primary gain over the prompted base >= min_gain_over_base
- ``beats_production``: primary gain over production >= min_gain_over_production
  (both with the paired interval's lower bound above 0 when require_ci_above_zero)
- ``regression``: each general-ability suite (the built-in one, and each lm-eval
  task in ``[eval.lm_eval]``) dropped by at most max_regression_drop against
  production (or the base when there is none)
- ``json_valid``: at least min_json_valid, for tasks whose answers are JSON
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraflow.registry import domain
from loraflow.registry.settings import GatePolicy


@dataclass(frozen=True)
class RuleResult:
    rule: str
    passed: bool
    detail: str
    shortfall: float | None = None  # how much more the version needed; None when it passed

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "passed": self.passed, "detail": self.detail, "shortfall": self.shortfall}


@dataclass(frozen=True)
class GateDecision:
    candidate: str
    alias: str
    rules: list[RuleResult] = field(default_factory=list)
    evaluation: int | None = None  # the report's id

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rules)

    @property
    def failed(self) -> list[RuleResult]:
        return [r for r in self.rules if not r.passed]

    def message(self) -> str:
        if self.passed:
            return f"the gate passes {self.candidate} for {self.alias}"
        lines = "; ".join(f"{r.rule}: {r.detail}" for r in self.failed)
        return f"the gate refuses {self.candidate} for {self.alias}: {lines}"

    def to_json(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "passed": self.passed,
            "evaluation": self.evaluation,
            "rules": [r.to_json() for r in self.rules],
        }


def regression_suites(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's general-ability suites: the built-in one, then each lm-eval task."""
    suites = [report["regression"]] if report.get("regression") else []
    return suites + list((report.get("lm_eval") or {}).get("tasks") or [])


def _regression_rule(suite: dict[str, Any], against: str, max_drop: float) -> RuleResult:
    diff = (suite.get("comparisons", {}).get(against) or {}).get("diff")
    name = f"{suite.get('metric')} on the {suite.get('suite')} suite"
    if diff is None:
        return RuleResult("regression", False, f"{name} has no comparison with {against}")
    # A drop is a loss in the metric's good direction.
    drop = -float(diff) if suite.get("higher_is_better", True) else float(diff)
    detail = f"{name} moved {_fmt(float(diff))} against {against}; may drop at most {max_drop:.4g}"
    if drop > max_drop:
        short = drop - max_drop
        return RuleResult("regression", False, f"{detail}: short by {short:.4g}", round(short, 6))
    return RuleResult("regression", True, detail)


def _fmt(x: float) -> str:
    return f"{x + 0.0:+.4g}"  # + 0.0: never print -0


def _gain_rule(
    rule: str,
    comparison: dict[str, Any] | None,
    *,
    metric: str,
    against: str,
    min_gain: float,
    need_ci: bool,
    confidence: float,
) -> RuleResult:
    if comparison is None or comparison.get(metric, {}).get("diff") is None:
        return RuleResult(rule, False, f"the report has no {metric} comparison with {against}", None)
    diff = float(comparison[metric]["diff"])
    ci = comparison[metric].get("ci")
    where = f"{metric} gain over {against} is {_fmt(diff)}"
    if ci is not None:
        where += f" ({confidence:.0%} CI [{ci[0]:+.4g}, {ci[1]:+.4g}])"
    needs = f"needs >= {_fmt(min_gain)}" + (" with the interval's lower bound above 0" if need_ci else "")
    shortfalls = []
    if diff < min_gain:
        shortfalls.append(min_gain - diff)
    if need_ci and (ci is None or ci[0] <= 0):
        shortfalls.append(max(0.0, -ci[0]) if ci is not None else abs(diff))
    if not shortfalls:
        return RuleResult(rule, True, f"{where}; {needs}")
    short = max(shortfalls)
    return RuleResult(rule, False, f"{where}; {needs}: short by {short:.4g}", round(short, 6))


def check(
    policy: GatePolicy,
    evaluation: domain.EvaluationInfo | None,
    *,
    candidate: domain.VersionInfo,
    alias: str,
    production: int | None,
) -> GateDecision:
    """The gate's decision for moving ``alias`` to ``candidate``; production points at ``production``."""
    ref = candidate.ref
    if evaluation is None:
        return GateDecision(
            ref,
            alias,
            [
                RuleResult(
                    "report",
                    False,
                    f"{ref} has no eval report; run `loraflow eval {ref}` (or promote with --force --reason)",
                )
            ],
        )
    fresh = RuleResult("fresh", True, f"made against production {_version(evaluation.production_version)}")
    if evaluation.production_version != production:
        fresh = RuleResult(
            "fresh",
            False,
            f"the report (evaluation {evaluation.id}) was made against production "
            f"{_version(evaluation.production_version)}, but production is now {_version(production)}; "
            f"it is stale: re-run `loraflow eval {ref}`",
        )
        return GateDecision(ref, alias, [fresh], evaluation.id)
    report = evaluation.report
    metric = policy.primary_metric or report.get("primary_metric") or "exact_match"
    confidence = float(report.get("confidence", 0.95))
    rules = [fresh]
    if metric not in report.get("metrics", []):
        rules.append(
            RuleResult(
                "primary_metric",
                False,
                f"the report has no {metric}; it has {', '.join(report.get('metrics', [])) or 'none'}",
            )
        )
        return GateDecision(ref, alias, rules, evaluation.id)
    comparisons = report.get("comparisons", {})
    rules.append(
        _gain_rule(
            "beats_base",
            comparisons.get("base"),
            metric=metric,
            against="the prompted base",
            min_gain=policy.min_gain_over_base,
            need_ci=policy.require_ci_above_zero,
            confidence=confidence,
        )
    )
    if production is not None:
        rules.append(
            _gain_rule(
                "beats_production",
                comparisons.get("production"),
                metric=metric,
                against=f"production v{production}",
                min_gain=policy.min_gain_over_production,
                need_ci=policy.require_ci_above_zero,
                confidence=confidence,
            )
        )
    if policy.max_regression_drop is not None:
        against = "production" if production is not None else "base"
        for suite in regression_suites(report):
            rules.append(_regression_rule(suite, against, policy.max_regression_drop))
    if policy.min_json_valid is not None and "json_valid" in report.get("metrics", []):
        value = report["systems"]["candidate"]["metrics"]["json_valid"]["mean"]
        detail = f"json_valid is {value}; needs >= {policy.min_json_valid:.4g}"
        if value is None or value < policy.min_json_valid:
            short = policy.min_json_valid - (value or 0.0)
            rules.append(RuleResult("json_valid", False, f"{detail}: short by {short:.4g}", round(short, 6)))
        else:
            rules.append(RuleResult("json_valid", True, detail))
    return GateDecision(ref, alias, rules, evaluation.id)


def _version(v: int | None) -> str:
    return f"v{v}" if v is not None else "nothing"
