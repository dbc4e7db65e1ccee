"""Tasks in the manifest: creating them, claiming batches atomically, leases.

A task is one (item, model). Workers take pending tasks in one short BEGIN IMMEDIATE
transaction (`claim_batch`), holding them under a lease they renew while they work. A
lease that runs out, or whose owner process is gone, returns its tasks to pending, so
a killed worker's work is redone by someone else, never lost. Only the writer moves a
task to done, and only while the claiming owner still holds it: a task is done once.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from embstore.audio import resampled_length, span_frames
from embstore.store import immediate

HOST = socket.gethostname()


class LeaseExpired(Exception):
    """A worker's claim was taken back (lease ran out) before its results were written."""


@dataclass(frozen=True)
class ClaimedTask:
    task_id: int
    item_id: int
    uid: str
    path: str
    start: float | None
    end: float | None
    duration: float
    length: int


def new_owner() -> str:
    """host:pid:token - the pid lets a restart on this host free a dead process's claims at once."""
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    if host != HOST:
        return False  # another machine's worker: only its lease can tell
    try:
        pid = int(rest.split(":", 1)[0])
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _register_length_function(conn: sqlite3.Connection, feature_length: Callable[[int], int], rate: int) -> None:
    def length(frames, file_rate, start, end):
        if frames is None or not file_rate:
            return 0
        n = span_frames(int(frames), int(file_rate), start, end)
        return int(feature_length(resampled_length(n, int(file_rate), rate)))

    conn.create_function("embstore_length", 4, length, deterministic=True)


def refresh_tasks(
    conn: sqlite3.Connection,
    model_id: int,
    feature_length: Callable[[int], int],
    sample_rate: int,
    retry_failed: bool = False,
) -> dict[str, int]:
    """Make the task list current: tasks for new items, stale ones back to pending
    (with their new length), claims of dead local processes and expired leases released."""
    _register_length_function(conn, feature_length, sample_rate)
    now = time.time()
    counts = {}
    with immediate(conn):
        last = conn.execute("SELECT coalesce(max(item_id), 0) FROM tasks WHERE model_id = ?", (model_id,)).fetchone()[0]
        cur = conn.execute(
            "INSERT OR IGNORE INTO tasks (item_id, model_id, status, length)"
            " SELECT i.id, ?, 'pending', embstore_length(f.frames, f.sample_rate, i.start, i.end)"
            " FROM items i JOIN files f ON f.id = i.file_id WHERE i.id > ? AND i.removed = 0",
            (model_id, last),
        )
        counts["new"] = cur.rowcount
        # items that were removed and came back, or got no task while removed
        cur = conn.execute(
            "INSERT OR IGNORE INTO tasks (item_id, model_id, status, length)"
            " SELECT i.id, ?, 'pending', embstore_length(f.frames, f.sample_rate, i.start, i.end)"
            " FROM items i JOIN files f ON f.id = i.file_id WHERE i.id <= ? AND i.removed = 0"
            " AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.item_id = i.id AND t.model_id = ?)",
            (model_id, last, model_id),
        ) if _has_gaps(conn, model_id) else None
        counts["new"] += cur.rowcount if cur is not None else 0
        cur = conn.execute(
            "UPDATE tasks SET status = 'pending', owner = NULL, lease_until = NULL,"
            " length = (SELECT embstore_length(f.frames, f.sample_rate, i.start, i.end)"
            "           FROM items i JOIN files f ON f.id = i.file_id WHERE i.id = tasks.item_id)"
            " WHERE model_id = ? AND status = 'stale'",
            (model_id,),
        )
        counts["stale"] = cur.rowcount
        counts["released"] = release_lost(conn, model_id, now)
        counts["retried"] = 0
        if retry_failed:
            cur = conn.execute(
                "UPDATE tasks SET status = 'pending', error = NULL, stage = NULL WHERE model_id = ? AND status = 'failed'",
                (model_id,),
            )
            counts["retried"] = cur.rowcount
    return counts


def _has_gaps(conn: sqlite3.Connection, model_id: int) -> bool:
    """Cheap check whether some live item below the high-water mark lacks a task."""
    items = conn.execute("SELECT count(*) FROM items WHERE removed = 0").fetchone()[0]
    tasks = conn.execute(
        "SELECT count(*) FROM tasks t JOIN items i ON i.id = t.item_id WHERE t.model_id = ? AND i.removed = 0",
        (model_id,),
    ).fetchone()[0]
    return tasks < items


def release_lost(conn: sqlite3.Connection, model_id: int, now: float) -> int:
    """Back to pending: claims whose lease ran out, and those of dead processes on this host."""
    released = _release_expired(conn, model_id, now)
    owners = [r[0] for r in conn.execute(
        "SELECT DISTINCT owner FROM tasks WHERE model_id = ? AND status = 'claimed'", (model_id,)
    )]
    for owner in owners:
        if owner and owner_is_dead(owner):
            released += conn.execute(
                "UPDATE tasks SET status = 'pending', owner = NULL, lease_until = NULL"
                " WHERE owner = ? AND status = 'claimed'",
                (owner,),
            ).rowcount
    return released


def claim_batch(
    conn: sqlite3.Connection,
    model_id: int,
    owner: str,
    lease_seconds: float,
    max_items: int,
    max_frames: int,
    order: str = "length",
) -> list[ClaimedTask]:
    """Atomically take up to `max_items` pending tasks (about `max_frames` frames in all).

    order="length" takes the shortest pending lengths first, so equal lengths come
    together (exact batching); order="item" takes scan order, which keeps a speaker's
    rows together in the store.
    """
    order_sql = "t.length, t.item_id" if order == "length" else "t.item_id"
    now = time.time()
    with immediate(conn):
        _release_expired(conn, model_id, now)
        candidates = conn.execute(
            "SELECT t.id, t.length FROM tasks t JOIN items i ON i.id = t.item_id"
            f" WHERE t.model_id = ? AND t.status = 'pending' AND i.removed = 0 ORDER BY {order_sql} LIMIT ?",
            (model_id, max_items),
        ).fetchall()
        chosen, frames = [], 0
        for task_id, length in candidates:
            if chosen and frames + max(length, 1) > max_frames:
                break
            chosen.append(task_id)
            frames += max(length, 1)
        if not chosen:
            return []
        marks = ",".join("?" * len(chosen))
        conn.execute(
            f"UPDATE tasks SET status = 'claimed', owner = ?, lease_until = ?, attempts = attempts + 1"
            f" WHERE id IN ({marks})",
            (owner, now + lease_seconds, *chosen),
        )
        rows = conn.execute(
            "SELECT t.id, t.item_id, i.uid, r.path AS root, f.path, i.start, i.end, i.duration, t.length"
            " FROM tasks t JOIN items i ON i.id = t.item_id JOIN files f ON f.id = i.file_id"
            f" JOIN roots r ON r.id = f.root_id WHERE t.id IN ({marks}) ORDER BY {order_sql}",
            chosen,
        ).fetchall()
    return [
        ClaimedTask(r[0], r[1], r[2], os.path.join(r[3], r[4]), r[5], r[6], r[7] or 0.0, r[8]) for r in rows
    ]


def _release_expired(conn: sqlite3.Connection, model_id: int, now: float) -> int:
    return conn.execute(
        "UPDATE tasks SET status = 'pending', owner = NULL, lease_until = NULL"
        " WHERE model_id = ? AND status = 'claimed' AND lease_until < ?",
        (model_id, now),
    ).rowcount


def renew_lease(conn: sqlite3.Connection, owner: str, lease_seconds: float) -> int:
    with immediate(conn):
        n = conn.execute(
            "UPDATE tasks SET lease_until = ? WHERE owner = ? AND status = 'claimed'",
            (time.time() + lease_seconds, owner),
        ).rowcount
    return n


def release_claims(conn: sqlite3.Connection, owner: str) -> int:
    """Give back everything `owner` still holds (a clean stop, or a worker found dead)."""
    with immediate(conn):
        n = conn.execute(
            "UPDATE tasks SET status = 'pending', owner = NULL, lease_until = NULL WHERE owner = ? AND status = 'claimed'",
            (owner,),
        ).rowcount
    return n


def pending_summary(conn: sqlite3.Connection, model_id: int) -> tuple[int, float]:
    """(tasks left to do, their seconds of audio)."""
    n, secs = conn.execute(
        "SELECT count(*), coalesce(sum(i.duration), 0) FROM tasks t JOIN items i ON i.id = t.item_id"
        " WHERE t.model_id = ? AND t.status IN ('pending', 'claimed', 'stale') AND i.removed = 0",
        (model_id,),
    ).fetchone()
    return int(n), float(secs)
