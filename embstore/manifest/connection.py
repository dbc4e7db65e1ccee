"""SQLite connections, transactions and the small SQL helpers every layer shares."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Sequence, TypeVar

from embstore.errors import StoreError

T = TypeVar("T")

# SQLite's default limit on host parameters is 999 (32766 since 3.32); 900 leaves room
# for the other parameters of a statement
IN_CHUNK = 900

# an item that still exists in its source; removed items drop out of every query
LIVE_ITEM = "i.removed = 0"


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def connect(db_path: str | os.PathLike) -> sqlite3.Connection:
    """A connection in autocommit mode: transactions are explicit (`immediate`)."""
    conn = sqlite3.connect(str(db_path), timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 60000")
    conn.execute("PRAGMA foreign_keys = ON")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise StoreError(f"{db_path}: cannot switch SQLite to WAL mode (got {mode}); is it on a network filesystem?")
    # WAL + NORMAL survives process crashes (kill -9) without losing committed work
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.row_factory = sqlite3.Row
    return conn


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection; ROLLBACK on any error.

    Taking the write lock at BEGIN means a transaction never fails half-way on a lock
    another writer holds (busy_timeout waits for it instead)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:  # SQLite already rolled back on SQLITE_FULL / IOERR
            conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")


@contextlib.contextmanager
def read_snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN (deferred) ... COMMIT: every read inside sees one snapshot, so a writer
    committing meanwhile cannot make two reads disagree. Takes no write lock."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


def chunks(values: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    """`values` in slices small enough for one `IN (?, ...)` list."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def marks(n: int) -> str:
    """`?,?,...` for an IN list of n values."""
    return ",".join("?" * n)


def select_in(
    conn: sqlite3.Connection,
    sql: str,
    values: Sequence[Any],
    params_before: Sequence[Any] = (),
    params_after: Sequence[Any] = (),
) -> list[sqlite3.Row]:
    """Run `sql` (holding one `{marks}` placeholder for an IN list) over `values` in
    chunks and return all rows: lookups by id lists of any length."""
    rows: list[sqlite3.Row] = []
    for chunk in chunks(list(values)):
        rows += conn.execute(sql.format(marks=marks(len(chunk))), (*params_before, *chunk, *params_after)).fetchall()
    return rows


def execute_in(conn: sqlite3.Connection, sql: str, values: Sequence[Any], params_before: Sequence[Any] = ()) -> int:
    """Run a write statement holding one `{marks}` IN list over `values` in chunks;
    returns the rows changed."""
    changed = 0
    for chunk in chunks(list(values)):
        changed += conn.execute(sql.format(marks=marks(len(chunk))), (*params_before, *chunk)).rowcount
    return changed


def scalar(conn: sqlite3.Connection, sql: str, params: Iterable[Any] = ()) -> Any:
    """The first column of the first row (None when there is none)."""
    row = conn.execute(sql, tuple(params)).fetchone()
    return None if row is None else row[0]
