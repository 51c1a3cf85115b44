"""An evaluation report on the terminal: its headline (``adapters show``) and its tables
(``loraflow eval``)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from loraflow.cli.common import out


def _cell(stat: dict[str, Any] | None, key: str = "mean") -> str:
    if not stat or stat.get(key) is None:
        return "-"
    ci = stat.get("ci")
    return f"{stat[key]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{stat[key]:.3f}"


def headline(report: dict[str, Any]) -> str:
    """One line: the primary metric of each system (prompted base, production, candidate) with its
    interval, and the candidate's differences; what `adapters show NAME@vN` prints of a report."""
    primary = report.get("primary_metric")
    systems = report.get("systems") or {}
    if not primary or not systems:
        return "no primary metric in this report"
    parts = [
        f"{s.get('label', key)} {_cell((s.get('metrics') or {}).get(primary))}" for key, s in systems.items()
    ]
    diffs = [
        f"Δ vs {key} {_cell(c.get(primary), 'diff')}" for key, c in (report.get("comparisons") or {}).items()
    ]
    where = (
        f" on {report.get('dataset')} {report.get('split')} (n={report.get('n')})" if report.get("n") else ""
    )
    return f"{primary}{where}: " + ", ".join(parts) + ("; " + ", ".join(diffs) if diffs else "")


def print_report(report: dict[str, Any]) -> None:
    from loraflow.registry.gate import regression_suites  # settings and pydantic: not at start-up

    systems, comparisons = report["systems"], report["comparisons"]
    out.print(
        f"{report['candidate']} on {report['dataset'] or '-'} {report['split']} (n={report['n']}, "
        f"split {report['split_digest'][:12]}), {report['confidence']:.0%} paired bootstrap intervals",
        markup=False,
    )
    table = Table(
        "metric", *(escape(s["label"]) for s in systems.values()), *(f"Δ vs {escape(k)}" for k in comparisons)
    )
    for metric in report["metrics"]:
        name = f"{metric} *" if metric == report["primary_metric"] else metric
        table.add_row(
            escape(name),
            *(_cell(s["metrics"].get(metric)) for s in systems.values()),
            *(_cell(c.get(metric), "diff") for c in comparisons.values()),
        )
    for suite in regression_suites(report):
        table.add_row(
            escape(f"regression {suite['suite']} ({suite['metric']})"),
            *(_cell(suite["systems"].get(k)) for k in systems),
            *(_cell(suite["comparisons"].get(k), "diff") for k in comparisons),
        )
    judge = report.get("judge")
    if judge:
        table.add_row(
            "judge",
            *(_cell(judge["systems"].get(k)) for k in systems),
            *(_cell(judge["comparisons"].get(k), "diff") for k in comparisons),
        )
    out.print(table)
