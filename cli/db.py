"""`loraflow db …`: registry schema migrations."""

from __future__ import annotations

import typer

from loraflow.cli.common import guarded, out, state
from loraflow.registry import db

app = typer.Typer(name="db", help="Registry database schema.", no_args_is_help=True, add_completion=False)


@app.command()
@guarded
def upgrade(ctx: typer.Context) -> None:
    """Upgrade the registry database to the schema this code expects."""
    engine = db.make_engine(state(ctx).get_settings().resolved_database_url)
    try:
        before = db.current_revision(engine)
        db.upgrade(engine)
        out.print(f"registry schema: {before or 'empty'} -> {db.current_revision(engine)}")
    finally:
        engine.dispose()


@app.command()
@guarded
def current(ctx: typer.Context) -> None:
    """Print the schema revision of the registry database and the one the code expects."""
    engine = db.make_engine(state(ctx).get_settings().resolved_database_url)
    try:
        out.print(f"database: {db.current_revision(engine) or 'empty'}  code: {db.head_revision()}")
    finally:
        engine.dispose()
