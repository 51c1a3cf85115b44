"""A write that loses to a concurrent one is told by the driver's error code, never its message."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg.errors
import pytest

from loraflow.registry.store import busy

pytestmark = pytest.mark.store


@pytest.fixture
def locked_sqlite(tmp_path: Path) -> Iterator[sqlite3.OperationalError]:
    """The error a second writer gets while a first holds SQLite's write lock."""
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, timeout=0, isolation_level=None)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(sqlite3.OperationalError) as caught:
            other.execute("BEGIN IMMEDIATE")
        yield caught.value
    finally:
        holder.close()
        other.close()


def test_a_locked_sqlite_database_is_busy(locked_sqlite: sqlite3.OperationalError) -> None:
    assert locked_sqlite.sqlite_errorcode == sqlite3.SQLITE_BUSY
    assert busy(locked_sqlite)


def test_other_sqlite_errors_are_not_busy_even_when_their_text_says_locked(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db")
    try:
        with pytest.raises(sqlite3.OperationalError) as caught:
            conn.execute('SELECT * FROM "the table is locked"')
    finally:
        conn.close()
    assert "locked" in str(caught.value) and not busy(caught.value)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (psycopg.errors.DeadlockDetected(), True),
        (psycopg.errors.SerializationFailure(), True),
        (psycopg.errors.LockNotAvailable(), True),
        (psycopg.errors.UndefinedTable("deadlock in the name"), False),
        (None, False),
    ],
)
def test_postgresql_errors_are_busy_by_sqlstate(error: BaseException | None, expected: bool) -> None:
    assert busy(error) is expected
