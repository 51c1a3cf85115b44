"""Database engines and schema migrations (Alembic).

SQLite databases are upgraded automatically when opened (under a file lock, so
concurrent processes do not race). Any other database must be upgraded
explicitly with ``loraflow db upgrade``; opening one that is behind raises
:class:`SchemaOutOfDateError`.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from loraflow.registry.errors import MissingDependencyError, SchemaOutOfDateError

MIGRATIONS = Path(__file__).parent / "migrations"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str) -> Engine:
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        return engine
    if make_url(url).get_backend_name() == "postgresql":
        url = _with_psycopg(url)
    return create_engine(url, pool_pre_ping=True)


def _with_psycopg(url: str) -> str:
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "PostgreSQL needs the psycopg driver: pip install 'loraflow[postgres]'", param="database_url"
        ) from exc
    return parsed.render_as_string(hide_password=False)


def _alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(_alembic_config(engine), revision)


def ensure_schema(engine: Engine) -> None:
    """Make sure the schema is at head: upgrade SQLite in place, refuse anything else."""
    head = head_revision()
    if current_revision(engine) == head:
        return
    if engine.dialect.name != "sqlite":
        raise SchemaOutOfDateError(
            f"the registry database is at schema {current_revision(engine)!r}, the code expects {head!r}; "
            "run `loraflow db upgrade`",
            param="database_url",
        )
    database = engine.url.database
    lock_path = Path(f"{database}.lock") if database and database != ":memory:" else None
    if lock_path is None:
        upgrade(engine)
        return
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if current_revision(engine) != head:
                upgrade(engine)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
