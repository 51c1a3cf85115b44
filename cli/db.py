"""`loraflow db …`: registry schema migrations."""

from __future__ import annotations

from typing import Annotated

import typer

from loraflow.cli.common import guarded, out, print_json, state

app = typer.Typer(name="db", help="Registry database schema.", no_args_is_help=True, add_completion=False)


@app.command()
@guarded
def upgrade(ctx: typer.Context) -> None:
    """Upgrade the registry database to the schema this code expects.

    Example: loraflow db upgrade
    """
    from loraflow.registry import db  # SQLAlchemy and Alembic: only in these commands

    engine = db.make_engine(state(ctx).get_settings().resolved_database_url)
    try:
        before = db.current_revision(engine)
        db.upgrade(engine)
        out.print(f"registry schema: {before or 'empty'} -> {db.current_revision(engine)}")
    finally:
        engine.dispose()


@app.command()
@guarded
def current(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the revisions as JSON.")] = False,
) -> None:
    """Print the schema revision of the registry database and the one the code expects.

    Example: loraflow db current --json
    """
    from loraflow.registry import db  # SQLAlchemy and Alembic: only in these commands

    url = state(ctx).get_settings().resolved_database_url
    db.check_exists(url)  # it only reads: a missing SQLite file is named, not created
    engine = db.make_engine(url)
    try:
        now, head = db.current_revision(engine), db.head_revision()
        if as_json:
            print_json({"database": now, "code": head, "up_to_date": now == head})
            return
        out.print(f"database: {now or 'empty'}  code: {head}")
    finally:
        engine.dispose()
