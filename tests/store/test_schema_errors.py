"""A registry database whose schema Alembic cannot upgrade from: a typed error naming what is there
and what to do (exit 7, one line, no traceback), never Alembic's CommandError or "cannot open".

Cases: a revision newer than this code (a newer loraflow upgraded it), two rows in alembic_version,
loraflow's tables without alembic_version, and a migration that fails partway. Each on SQLite and
PostgreSQL, through the ``Registry`` facade and the db functions `loraflow db upgrade/current` use.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from loraflow.cli.common import EXIT_CODES
from loraflow.registry import db
from loraflow.registry.errors import ErrorCode, SchemaOutOfDateError
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from tests.factories import run_loraflow

pytestmark = pytest.mark.store

SCHEMA = EXIT_CODES[ErrorCode.SCHEMA_OUT_OF_DATE]  # 7 in the README's list


def _sql(url: str, *statements: str) -> None:
    engine = db.make_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def _lock_file(url: str) -> Path | None:
    database = sa.engine.make_url(url).database
    return Path(f"{database}.lock") if url.startswith("sqlite") and database else None


def _assert_refused(url: str, tmp_path: Path, match: str) -> None:
    """Opening the registry, `db upgrade` and `db current` all refuse with the same typed error, and
    opening a database that is not behind takes no upgrade lock."""
    with pytest.raises(SchemaOutOfDateError, match=match) as opened:
        Registry.open(Settings(home=tmp_path / "home", database_url=url), create=False)
    assert opened.value.param == "database_url"
    assert "\n" not in opened.value.message
    lock = _lock_file(url)
    assert lock is None or not lock.exists(), "a database that is not behind took the upgrade lock"
    engine = db.make_engine(url)
    try:
        with pytest.raises(SchemaOutOfDateError, match=match):
            db.current_revision(engine)
        with pytest.raises(SchemaOutOfDateError, match=match):
            db.upgrade(engine)
    finally:
        engine.dispose()


def test_a_database_ahead_of_the_code_says_upgrade_loraflow(db_url: str, tmp_path: Path) -> None:
    _sql(db_url, "UPDATE alembic_version SET version_num = '0099'")
    head = db.head_revision()
    _assert_refused(
        db_url, tmp_path, rf"at schema 0099, newer than this loraflow \(head {head}\): upgrade loraflow"
    )
    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [
                "0099"
            ]
    finally:
        engine.dispose()


def test_two_rows_in_alembic_version_are_named(db_url: str, tmp_path: Path) -> None:
    _sql(db_url, "INSERT INTO alembic_version (version_num) VALUES ('0003')")
    _assert_refused(db_url, tmp_path, rf"more than one schema revision \(0003, {db.head_revision()}\)")


def test_loraflow_tables_without_alembic_version_are_named(db_url: str, tmp_path: Path) -> None:
    _sql(db_url, "DROP TABLE alembic_version")
    _assert_refused(db_url, tmp_path, r"has loraflow tables \(adapter, .*\) but no alembic_version table")


def test_a_migration_that_fails_names_the_revision_it_started_from(empty_db_url: str, tmp_path: Path) -> None:
    engine = db.make_engine(empty_db_url)
    try:
        db.upgrade(engine, "0004")
    finally:
        engine.dispose()
    _sql(empty_db_url, "CREATE TABLE drift_report (id INTEGER PRIMARY KEY)")  # 0005 creates it
    engine = db.make_engine(empty_db_url)
    try:
        with pytest.raises(
            SchemaOutOfDateError, match=r"upgrading the registry schema of .* from 0004 to head failed: "
        ):
            db.upgrade(engine)
    finally:
        engine.dispose()
    if empty_db_url.startswith("sqlite"):  # SQLite upgrades on open: the same error, not "cannot open"
        with pytest.raises(SchemaOutOfDateError, match=r"from 0004 to head failed: .*drift_report"):
            Registry.open(Settings(home=tmp_path / "home", database_url=empty_db_url))


def test_the_cli_says_so_in_one_line_with_exit_7(db_url: str, tmp_path: Path) -> None:
    _sql(db_url, "UPDATE alembic_version SET version_num = '0099'")
    env = {"LORAFLOW_DATABASE_URL": db_url, "LORAFLOW_HOME": str(tmp_path / "home")}
    for args in (("adapters", "list"), ("db", "upgrade"), ("db", "current")):
        done = run_loraflow(*args, cwd=tmp_path, env=env)
        assert done.returncode == SCHEMA, (args, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr + done.stdout
        lines = done.stderr.strip().splitlines()
        assert (
            len(lines) == 1 and "newer than this loraflow" in lines[0] and "upgrade loraflow" in lines[0]
        ), lines
    done = run_loraflow("db", "current", "--json", cwd=tmp_path, env=env)
    assert done.returncode == SCHEMA, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "schema_out_of_date" and "newer than this loraflow" in error["message"]
