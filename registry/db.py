"""Database engines and schema migrations (Alembic).

SQLite databases are upgraded automatically when opened (under a file lock, so
concurrent processes do not race). Any other database must be upgraded
explicitly with ``loraflow db upgrade``; opening one that is behind raises
:class:`SchemaOutOfDateError`. So does a schema no upgrade can fix, before anything is locked or
changed (:func:`current_revision`): a revision newer than this code, several rows in alembic_version,
loraflow's tables without alembic_version; and a migration that fails names where it started.
Only a failed first connect is "cannot open/connect to the registry database".

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
from sqlalchemy.exc import ArgumentError, DBAPIError

from loraflow.registry.errors import (
    InvalidArgumentError,
    MissingDependencyError,
    NotFoundError,
    SchemaOutOfDateError,
    UnavailableError,
)
from loraflow.registry.urls import mask_url

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
            f"database_url {mask_url(url)!r} is not a database URL; e.g. sqlite:////data/registry.db or "
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
        try:
            with engine.connect():
                pass
        except DBAPIError as exc:  # only a failed first connect means the database cannot be reached
            raise _unreachable(parsed, exc) from None
        ensure_schema(engine)
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


def _unreachable(url: URL, exc: DBAPIError) -> InvalidArgumentError | UnavailableError:
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


# Tables the first migration creates: a database holding one of them but no revision in
# alembic_version was made outside loraflow's migrations (or lost its stamp); upgrading it would fail.
_LORAFLOW_TABLES = frozenset({"adapter", "adapter_version", "alias", "alias_move", "audit_event", "dataset"})


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision, checked: None for an empty database, else a revision this
    code's migrations know. Anything Alembic cannot upgrade from is SchemaOutOfDateError naming what
    is there and what to do: several rows in alembic_version, a revision newer than this code's head
    (a newer loraflow upgraded the database), or loraflow's tables without alembic_version."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError
    from sqlalchemy import inspect

    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            heads = MigrationContext.configure(conn).get_current_heads()
            tables = set(inspect(conn).get_table_names()) if not heads else set()
    except DBAPIError as exc:  # `loraflow db current/upgrade` on a server that is not there
        raise _unreachable(engine.url, exc) from None
    script = ScriptDirectory(str(MIGRATIONS))
    head = script.get_current_head()
    if len(heads) > 1:
        raise SchemaOutOfDateError(
            f"the registry database {where} is stamped with more than one schema revision "
            f"({', '.join(sorted(heads))}) in its alembic_version table; loraflow's migrations keep one "
            f"(head {head}): delete the rows that are wrong, or restore the database from a backup",
            param="database_url",
        )
    if not heads:
        found = sorted(tables & _LORAFLOW_TABLES)
        if found:
            raise SchemaOutOfDateError(
                f"the registry database {where} has loraflow tables ({', '.join(found)}) but no "
                "alembic_version table (or an empty one), so its schema revision is unknown: it was not "
                "created by loraflow's migrations; restore the database from a backup, or point "
                "database_url at a new database",
                param="database_url",
            )
        return None
    current = heads[0]
    try:
        known = script.get_revision(current) is not None
    except CommandError:  # "Can't locate revision identified by ..."
        known = False
    if not known:
        raise SchemaOutOfDateError(
            f"the registry database {where} is at schema {current}, newer than this loraflow "
            f"(head {head}): upgrade loraflow",
            param="database_url",
        )
    return current


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade to ``revision``; a migration that fails is SchemaOutOfDateError naming the revision it
    started from and the database's reason (no driver traceback)."""
    from alembic import command

    before = current_revision(engine)
    try:
        command.upgrade(_alembic_config(engine), revision)
    except DBAPIError as exc:
        text = str(exc.orig or exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise SchemaOutOfDateError(
            f"upgrading the registry schema of {engine.url.render_as_string(hide_password=True)} "
            f"from {before or 'empty'} to {revision} failed: {reason}; fix the cause and run "
            "`loraflow db upgrade` again",
            param="database_url",
        ) from None


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

    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except DBAPIError as exc:  # the server went away since the first connect: no driver traceback
        raise _unreachable(engine.url, exc) from None
    return str(rows[0]) if len(rows) == 1 else None


def ensure_schema(engine: Engine) -> None:
    """Make sure the schema is at head: upgrade SQLite in place, refuse anything else."""
    fast_head = head_from_files()
    if fast_head is not None and stamped_revision(engine) == fast_head:
        return  # at head: no Alembic import
    head = head_revision()
    current = current_revision(engine)  # checked: one revision this code knows, before any upgrade
    if current == head:
        return
    if engine.dialect.name != "sqlite":
        raise SchemaOutOfDateError(
            f"the registry database is at schema {current or 'empty'}, the code expects {head}; "
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
