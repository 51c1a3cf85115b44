"""`loraflow eval NAME@vN`: a version against the prompted base and production; the report is stored."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loraflow.cli.common import guarded, out, print_json, state
from loraflow.cli.eval_report import print_report


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
        Path | None,
        typer.Option(
            help="Also write the report as a self-contained HTML page: the page stored with the report, "
            "with the promotion gate's verdict of now."
        ),
    ] = None,
) -> None:
    """Generate through vLLM and the gateway, score, compare with intervals, and store the report.

    Uses eval.gateway_url when set; otherwise starts an engine and the gateway here, as
    `loraflow serve` does. The report is what `adapters promote` checks; its HTML page is stored
    beside it.

    Example: loraflow eval support@v3 --html report.html
    """
    from loraflow.cli.endpoint import eval_endpoint
    from loraflow.cli.refs import adapter_ref
    from loraflow.trainer.eval.run import evaluate as run_eval

    ref = str(adapter_ref(ctx, ref, param="NAME@vN", version_first=True))  # @vN, :ALIAS: default_adapter
    app = state(ctx)
    settings = app.get_settings()
    result = run_eval(
        ref,
        registry=app.registry,
        settings=settings,
        endpoint=eval_endpoint(settings, app.registry),
        dataset=dataset,
        split=split,
    )
    report = result.report
    decision = app.registry.gate(report["adapter"], report["version"])
    if html is not None:
        from loraflow.trainer.reports.eval_page import write_html

        write_html(report, html, gate=decision.to_json())
    if as_json:
        print_json(report | {"evaluation": result.evaluation.id, "gate": decision.to_json()})
        return
    print_report(report)
    out.print(f"stored as evaluation {result.evaluation.id} of {result.evaluation.ref}", markup=False)
    out.print(decision.message(), markup=False)
    if html is not None:
        out.print(f"HTML report: {html}", markup=False)
