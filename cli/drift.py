"""`loraflow drift NAME`: a version's sampled traffic against its training split, with verdicts."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from loraflow.cli.common import guarded, out, print_json, state
from loraflow.registry.refs import parse_ref


@guarded
def drift(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="NAME (its production version), NAME:ALIAS or NAME@vN.")],
    window: Annotated[str, typer.Option(help="How far back to look: 30m, 24h, 7d…")] = "24h",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write the report as an HTML page.")
    ] = None,
    embeddings: Annotated[
        bool,
        typer.Option(help="Compute embedding drift of prompts (all-MiniLM-L6-v2; needs the train extra)."),
    ] = True,
    store: Annotated[
        bool,
        typer.Option(help="Store the report and its HTML page on the version (gateways export it)."),
    ] = True,
) -> None:
    """Compare the sampled traffic of a version with its training split: PSI of prompt and output lengths,
    prompt embeddings, format validity, refusals and negative feedback, each with a verdict.

    Example: loraflow drift support --window 24h --html drift.html
    """
    from loraflow.registry.drift import figure_verdict  # pydantic: only in the commands that use it
    from loraflow.trainer.drift import drift_report
    from loraflow.trainer.reports.drift_page import render_html
    from loraflow.trainer.reports.render import require_page_libraries, write_page

    app = state(ctx)
    if store or html is not None:  # the page is stored with the report: refuse before any work
        require_page_libraries()
    from loraflow.registry.traffic import parse_duration  # fsspec: only in the commands that use it

    span = parse_duration(window, param="window")
    # The name (and version) first: loading the embedding model takes seconds.
    registry = app.existing_registry  # the adapter must be there already: a missing home is named
    registry.resolve(parse_ref(model, param="model"))
    embedder = None
    if embeddings:
        from loraflow.trainer.embed import Embedder

        embedder = Embedder()
    now = datetime.now(UTC)
    version, report = drift_report(
        registry, app.get_settings().drift, model, window=span, now=now, embedder=embedder
    )
    # One page, rendered from the report as it is stored: the one kept beside it is the one --html writes.
    page = render_html(report) if store or html is not None else None
    if store:
        stored = registry.record_drift(
            version.adapter,
            version.version,
            window_start=now - span,
            window_end=now,
            report=report,
            page=page,
        )
        report["id"] = stored.id
    if html is not None and page is not None:
        write_page(page, html)
    if as_json:
        print_json(report)
        return
    table = Table("figure", "value", "verdict", title=f"{version.ref}: {report['verdict']}")
    for name, value in report["figures"].items():
        verdict = figure_verdict(report["verdicts"], name)
        table.add_row(name, "-" if value is None else f"{value:.4f}", verdict)
    out.print(table)
    requests = report["requests"]
    out.print(
        f"{requests['answered']} answered requests sampled in the last {window}, "
        f"{requests['feedback']} feedback; against {report['dataset'] or 'no dataset'}"
    )
    reviews = report["reviews"]
    if reviews["reviewed"]:
        tagged = ", ".join(f"{name} {n}" for name, n in reviews["categories"].items()) or "none"
        out.print(
            f"{reviews['reviewed']} requests of {version.ref} reviewed: {reviews['negative']} rated down, "
            f"{reviews['corrected']} corrected; failure categories: {tagged}",
            markup=False,
        )
    for note in report["notes"]:
        out.print(note, markup=False)
    if html is not None:
        out.print(f"wrote {html}", markup=False)
