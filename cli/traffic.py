"""`loraflow traffic …`: the sampled traffic in the sink (already redacted), and deleting it."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated

import typer

from loraflow.cli.common import guarded, out, print_json, state
from loraflow.registry.errors import InvalidArgumentError, NotFoundError

app = typer.Typer(
    name="traffic", help="Sampled traffic: show and purge.", no_args_is_help=True, add_completion=False
)


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidArgumentError(
            f"--before must be a date YYYY-MM-DD, not {text!r}", param="before"
        ) from None


@app.command()
@guarded
def purge(
    ctx: typer.Context,
    before: Annotated[str | None, typer.Option(help="Delete every record made before this UTC date.")] = None,
    expired: Annotated[
        bool, typer.Option("--expired", help="Delete what is older than traffic.retention_days.")
    ] = False,
    request_id: Annotated[
        list[str] | None,
        typer.Option("--request-id", help="Delete this request and its feedback (repeatable)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was deleted as JSON.")] = False,
) -> None:
    """Delete traffic by date, by age (--expired) or by request id (e.g. a data-subject request).

    Example: loraflow traffic purge --request-id req-20261130-… --json
    """
    if before is not None and expired:
        raise InvalidArgumentError("give --before or --expired, not both", param="before")
    day = _day(before) if before is not None else None
    if day is None and not expired and not request_id:
        raise InvalidArgumentError(
            "say what to purge: --before DATE, --expired or --request-id", param="before"
        )
    registry = state(ctx).existing_registry  # a mistyped home has nothing to purge: named, not created
    if expired:
        day = registry.traffic.expired_before(registry.settings.traffic.retention_days)
    purged = registry.traffic.purge(before=day, request_ids=request_id or [])
    if as_json:
        print_json(
            {
                "records_deleted": purged.records_deleted,
                "files_deleted": purged.files_deleted,
                "before": day.isoformat() if day else None,
                "request_ids": request_id or [],
            }
        )
        return
    what = f"before {day.isoformat()}" if day else ""
    if request_id:
        what += (" and " if what else "") + f"{len(request_id)} request id(s)"
    out.print(f"purged {purged.records_deleted} records in {purged.files_deleted} files ({what})")


@app.command()
@guarded
def show(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(help="The x-request-id of a response.")],
) -> None:
    """Print a recorded request (as written: redacted) and its feedback, as JSON.

    Example: loraflow traffic show req-20260101-0123abcd
    """
    registry = state(ctx).existing_registry
    record = registry.traffic.find_request(request_id)
    if record is None:
        raise NotFoundError(f"no recorded request {request_id!r}", param="request_id")
    since = datetime.fromisoformat(record["at"]).astimezone(UTC)
    feedback = [
        f
        for f in registry.traffic.read("feedback", adapter=record["adapter"], since=since)
        if f["request_id"] == request_id
    ]
    print_json({"request": record, "feedback": feedback})
