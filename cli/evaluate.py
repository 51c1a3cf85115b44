"""`loraflow eval NAME@vN`: a version against the prompted base and production; the report is stored."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from loraflow.cli.common import guarded, out, print_json, state


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


@guarded
def evaluate(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME@vN", help="The version to evaluate (or NAME:ALIAS).")],
    dataset: Annotated[
        str | None, typer.Option(help="Dataset version NAME@vK; default the one the version was trained on.")
    ] = None,
    split: Annotated[str, typer.Option(help="The held-out split to score on.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    html: Annotated[
        Path | None, typer.Option(help="Also write the report as a self-contained HTML page.")
    ] = None,
) -> None:
    """Generate through vLLM and the gateway, score, compare with intervals, and store the report.

    Uses eval.gateway_url when set; otherwise starts an engine and the gateway here, as
    `loraflow serve` does. The report is what `adapters promote` checks.

    Example: loraflow eval support@v3 --html report.html
    """
    from loraflow.cli.adapters import adapter_ref
    from loraflow.trainer.evaluate import evaluate as run_eval

    ref = str(adapter_ref(ctx, ref, param="NAME@vN", version_first=True))  # @vN, :ALIAS: default_adapter
    app = state(ctx)
    settings = app.get_settings()
    result = run_eval(ref, registry=app.registry, settings=settings, dataset=dataset, split=split)
    report = result.report
    decision = app.registry.gate(report["adapter"], report["version"])
    if html is not None:
        from loraflow.trainer.report_html import write_html

        write_html(report, html, gate=decision.to_json())
    if as_json:
        print_json(report | {"evaluation": result.evaluation.id, "gate": decision.to_json()})
        return
    print_report(report)
    out.print(f"stored as evaluation {result.evaluation.id} of {result.evaluation.ref}", markup=False)
    out.print(decision.message(), markup=False)
    if html is not None:
        out.print(f"HTML report: {html}", markup=False)
