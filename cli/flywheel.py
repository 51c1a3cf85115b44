"""`loraflow flywheel …`: the next dataset from served traffic, and the whole retraining cycle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.markup import escape

from loraflow.cli.common import guarded, out, print_json, state
from loraflow.registry.errors import InvalidArgumentError

app = typer.Typer(
    name="flywheel",
    help="Turn sampled traffic and feedback into the next dataset and a gated candidate.",
    no_args_is_help=True,
    add_completion=False,
)

SinceOpt = Annotated[str | None, typer.Option(help="Traffic window, e.g. 24h or 7d; default flywheel.since.")]
UntilOpt = Annotated[
    str | None,
    typer.Option(
        help="End of the window: ISO 8601 (UTC if no zone) or 'now'. Default: the top of the current hour, "
        "so scheduled runs within one hour build the same dataset; traffic after it waits for the next run.",
        show_default=False,
    ),
]


def _window(since: str | None, until: str | None, default: str) -> tuple[timedelta, datetime | None]:
    from loraflow.registry.traffic import parse_duration  # fsspec: only in the commands that use it

    span = parse_duration(since or default, param="since")
    if until is None:
        return span, None
    if until.strip().lower() == "now":
        return span, datetime.now(UTC)
    try:
        end = datetime.fromisoformat(until)
    except ValueError:
        raise InvalidArgumentError(
            f"--until must be an ISO 8601 time such as 2026-11-30T18:00 or 'now', not {until!r}",
            param="until",
        ) from None
    return span, end if end.tzinfo else end.replace(tzinfo=UTC)


@app.command("build-dataset")
@guarded
def build_dataset(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The adapter whose traffic becomes its next dataset.")],
    since: SinceOpt = None,
    until: UntilOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the dataset and the counts as JSON.")
    ] = False,
) -> None:
    """Build (or find, by digest) the next dataset version from NAME's rated and corrected traffic.

    The window is [until - since, until), and until defaults to the top of the current hour.

    Traffic after that is left for the next run: pass --until now to include it.

    Example: loraflow flywheel build-dataset orders --since 7d --until now
    """
    from loraflow.trainer.flywheel.dataset import build_dataset as build

    app_state = state(ctx)
    settings = app_state.get_settings()
    span, end = _window(since, until, settings.flywheel.since)
    built = build(app_state.existing_registry, settings, name, since=span, until=end)
    if as_json:
        print_json({"dataset": built.dataset.ref, "created": built.created, **built.report})
        return
    verb = "registered" if built.created else "found (same splits, by digest)"
    counts = built.dataset.counts
    sizes = ", ".join(f"{split} {counts[split]}" for split in ("train", "val", "test"))
    out.print(f"{verb} dataset {built.dataset.ref}: {sizes}")
    for step, count in built.report["counts"].items():
        out.print(f"  {escape(step)}: {count}")
    # The failure categories reviewers tagged in the window's requests, per version.
    for version, tagged in (built.report.get("review_categories") or {}).items():
        summary = ", ".join(f"{escape(category)} {n}" for category, n in tagged.items()) or "none tagged"
        out.print(f"  review categories of v{escape(str(version))}: {summary}")


@app.command()
@guarded
def run(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The adapter to retrain.")],
    since: SinceOpt = None,
    until: UntilOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Build the dataset, train a candidate, evaluate it, and promote it (staging, or production when
    flywheel.auto_promote allows and the gate passes). Each step is skipped when already done.

    Example: loraflow flywheel run support --since 7d
    """
    from loraflow.cli.endpoint import eval_endpoint
    from loraflow.trainer.flywheel.cycle import run as run_cycle

    app_state = state(ctx)
    settings = app_state.get_settings()
    span, end = _window(since, until, settings.flywheel.since)
    registry = app_state.existing_registry  # the adapter must be there already: a missing home is named
    endpoint = eval_endpoint(settings, registry)
    cycle = run_cycle(registry, settings, name, endpoint=endpoint, since=span, until=end)
    if as_json:
        print_json(cycle.to_json())
        return
    for step in cycle.steps:
        detail = {k: v for k, v in step.items() if k not in ("step", "status", "gate", "traffic", "counts")}
        out.print(f"{step['step']}: {step['status']} {detail if detail else ''}".rstrip(), markup=False)
        if step["step"] == "gate" and step["status"] == "refused":
            for rule in step["gate"].get("rules", []):
                if not rule.get("passed", True):
                    out.print(f"  {rule.get('rule')}: {rule.get('detail', '')}", markup=False)
    where = cycle.promoted_to or "nowhere"
    out.print(f"candidate {cycle.candidate.ref if cycle.candidate else '-'} is on {where}", markup=False)
