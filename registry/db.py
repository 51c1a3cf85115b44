"""Database engines and schema migrations (Alembic).

SQLite databases are upgraded automatically when opened (under a file lock, so
concurrent processes do not race). Any other database must be upgraded
explicitly with ``loraflow db upgrade``; opening one that is behind raises
:class:`SchemaOutOfDateError`.

Alembic is imported only to upgrade or to report revisions: opening a registry whose schema
is at head reads alembic's version table with plain SQL and compares it with the newest
migration file (Alembic alone costs about a second of start-up).
"""

from __future__ import annotations

import fcntl
import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from loraflow.registry.errors import (
    InvalidArgumentError,
    MissingDependencyError,
    NotFoundError,
    SchemaOutOfDateError,
    UnavailableError,
)

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
# Seconds to wait for a PostgreSQL server to answer before saying it cannot be reached (libpq's
# default is forever: a host that drops packets would hang every command).
CONNECT_TIMEOUT_S = 10


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError:
        raise InvalidArgumentError(
            f"database_url {url!r} is not a database URL; e.g. sqlite:////data/registry.db or "
            "postgresql://user@host:5432/loraflow",
            param="database_url",
        ) from None


def describe_url(url: str) -> str:
    """The database a URL names, fit to print: its password hidden."""
    return _parse(url).render_as_string(hide_password=True)


def is_sqlite(url: str) -> bool:
    return _parse(url).get_backend_name() == "sqlite"


def open_engine(url: str, *, create: bool = True) -> Engine:
    """An engine on a registry database whose schema is at head, or an error a user can act on.

    With ``create=False`` (read-only commands) a SQLite file that does not exist is NotFoundError
    naming the path, instead of a new empty registry that would answer "nothing registered".
    A server that cannot be reached is UnavailableError naming it (no driver traceback)."""
    parsed = _parse(url)
    if not create:
        check_exists(url)
    engine = make_engine(url)
    try:
        ensure_schema(engine)
    except OperationalError as exc:
        engine.dispose()
        raise _unreachable(parsed, exc) from None
    except BaseException:
        engine.dispose()
        raise
    return engine


def check_exists(url: str) -> None:
    """For a command that only reads: a SQLite database that is not there is NotFoundError naming the
    path (opening it would create a new, empty one). A server database is checked by connecting."""
    parsed = _parse(url)
    database = parsed.database
    if not database or database == ":memory:" or parsed.get_backend_name() != "sqlite":
        return
    if not Path(database).is_file():
        raise NotFoundError(
            f"no registry database at {database}: check LORAFLOW_HOME or database_url (a command "
            "that only reads does not create one)",
            param="database_url",
        )


def _unreachable(url: URL, exc: OperationalError) -> InvalidArgumentError | UnavailableError:
    text = str(exc.orig or exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    if url.get_backend_name() == "sqlite":
        return InvalidArgumentError(
            f"cannot open the registry database {url.database}: {reason}; check LORAFLOW_HOME or "
            "database_url and that the folder is writable",
            param="database_url",
        )
    where = f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
    return UnavailableError(
        f"cannot connect to the registry database at {where}: {reason}; check database_url "
        "(LORAFLOW_DATABASE_URL) and that the server is running",
        param="database_url",
    )


def make_engine(url: str) -> Engine:
    if is_sqlite(url):
        database = _parse(url).database
        if database and database != ":memory:":
            folder = Path(database).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InvalidArgumentError(
                    f"cannot create {folder} for the registry database ({exc.strerror or exc}); "
                    "set LORAFLOW_HOME (or database_url) to a folder you can write",
                    param="home",
                ) from None
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        return engine
    parsed = _parse(url)
    if parsed.get_backend_name() == "postgresql":
        connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": CONNECT_TIMEOUT_S}
        return create_engine(_with_psycopg(url), pool_pre_ping=True, connect_args=connect_args)
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
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:  # `loraflow db current/upgrade` on a server that is not there
        raise _unreachable(engine.url, exc) from None


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(_alembic_config(engine), revision)


_REVISION_LINE = re.compile(r"^(down_revision|revision)\s*=\s*(?:'([^']*)'|\"([^\"]*)\"|None)\s*$", re.M)


@functools.cache
def head_from_files() -> str | None:
    """The head revision read from the migration files without Alembic: the one revision no other
    file revises. None when that is not plain to see (a branch, a merge, a file written another
    way); then :func:`ensure_schema` asks Alembic. A unit test holds it equal to :func:`head_revision`."""
    revisions: set[str] = set()
    revised: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        found = {m[1]: m[2] or m[3] or None for m in _REVISION_LINE.finditer(path.read_text())}
        if not found.get("revision") or "down_revision" not in found:
            return None
        revisions.add(str(found["revision"]))
        if found["down_revision"]:
            revised.add(str(found["down_revision"]))
    heads = revisions - revised
    return heads.pop() if len(heads) == 1 else None


def stamped_revision(engine: Engine) -> str | None:
    """The revision in Alembic's version table, read with plain SQL; None when there is no table
    or it does not hold exactly one row."""
    from sqlalchemy import inspect, text

    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return str(rows[0]) if len(rows) == 1 else None


def ensure_schema(engine: Engine) -> None:
    """Make sure the schema is at head: upgrade SQLite in place, refuse anything else."""
    fast_head = head_from_files()
    if fast_head is not None and stamped_revision(engine) == fast_head:
        return  # at head: no Alembic import
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
