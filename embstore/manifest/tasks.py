"""Extraction's statements on `tasks`: one task per (item, model). (What queries,
verify and evaluation read of it is in `reads`.)

Workers take pending tasks in one short BEGIN IMMEDIATE transaction (`claim_batch`),
holding them under a lease they renew while they work. A lease that runs out, or whose
owner process is gone, returns its tasks to pending, so a killed worker's work is redone
by someone else, never lost. Only the writer moves a task to done (`mark_done`), and only
while the claiming owner still holds it (`still_held`): a task is done once.

Owners are `host:pid:start:token` for local processes (a restart on the same host frees a dead
process's claims at once) and `ray:<node>:<actor>:<run>` on a cluster (the driver frees
those when it learns an actor is gone; leases are the fallback).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from typing import Any, Callable, Iterable, Sequence

from embstore.audio.io import resampled_length, span_frames
from embstore.manifest.connection import LIVE_ITEM, immediate, marks, scalar, select_in
from embstore.processes import HOST, is_running, own_start_mark


# what a claim returns per task, in this order (the client turns it into a ClaimedTask)
CLAIM_COLUMNS = "t.id, t.item_id, i.uid, r.path AS root, f.path, i.start, i.end, i.duration, t.length"
OPEN_STATES = ("pending", "claimed", "stale")
# failures that versions before 2026-12-04 stored against items although the machine was
# at fault (the VAD's package missing): not the items' own, so a run retries them unasked
LEGACY_ENVIRONMENT_FAILURE = (
    "(stage = 'vad' AND (error LIKE 'VadError: --vad % needs the % package%'"
    " OR error LIKE 'ModuleNotFoundError: No module named %'))"
)


# -- owners -------------------------------------------------------------------------------


def new_owner() -> str:
    """host:pid:start:token - the PID and its start mark let a restart on this host free
    a dead process's claims at once (see `embstore.processes`: a zombie or a reused PID
    is dead too); the token tells apart owners of one process."""
    return f"{HOST}:{os.getpid()}:{own_start_mark() or '-'}:{uuid.uuid4().hex[:8]}"


def process_owner(pid: int, mark: str | None) -> str:
    """The owner prefix of a local process (host:pid:start:), as `new_owner` begins."""
    return f"{HOST}:{pid}:{mark or '-'}:"


def owner_is_dead(owner: str) -> bool:
    """True only when the owner is a process of this host that no longer runs (gone, a
    zombie, or its PID now belongs to another process). Owners of other hosts and
    cluster actors are never dead here: their leases (and the cluster driver) decide."""
    host, _, rest = owner.partition(":")
    if host != HOST:
        return False
    parts = rest.split(":")
    try:
        pid = int(parts[0])
    except ValueError:
        return False
    # host:pid:start:token; owners of older versions are host:pid:token (no start mark)
    mark = parts[1] if len(parts) >= 3 and parts[1] != "-" else None
    return not is_running(pid, mark)


def claim_is_live(conn: sqlite3.Connection, owner: str, lease_until: float | None) -> bool:
    """Whether a claim still belongs to someone at work: its lease runs, its owner is not
    a dead process of this host, and its cluster run has not ended."""
    if lease_until is not None and lease_until < time.time():
        return False
    return not (owner_is_dead(owner) or ray_run_is_gone(conn, owner))


def describe_owner(owner: str) -> str:
    """A claim owner in words: `pid 1234 on HOST`, or `a cluster run (run 7)`."""
    if owner.startswith("ray:"):
        return f"a cluster run (run {owner.rsplit(':', 1)[-1]})"
    host, _, rest = owner.partition(":")
    return f"pid {rest.split(':', 1)[0]} on {host}"


# -- the task list ------------------------------------------------------------------------


def _register_length_function(conn: sqlite3.Connection, feature_length: Callable[[int], int], rate: int) -> None:
    def length(frames: Any, file_rate: Any, start: Any, end: Any) -> int:
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
        last = high_water_item(conn, model_id)
        cur = conn.execute(
            "INSERT OR IGNORE INTO tasks (item_id, model_id, status, length)"
            " SELECT i.id, ?, 'pending', embstore_length(f.frames, f.sample_rate, i.start, i.end)"
            f" FROM items i JOIN files f ON f.id = i.file_id WHERE i.id > ? AND {LIVE_ITEM}",
            (model_id, last),
        )
        counts["new"] = cur.rowcount
        if _has_gaps(conn, model_id):
            # items that were removed and came back, or got no task while removed
            counts["new"] += conn.execute(
                "INSERT OR IGNORE INTO tasks (item_id, model_id, status, length)"
                " SELECT i.id, ?, 'pending', embstore_length(f.frames, f.sample_rate, i.start, i.end)"
                f" FROM items i JOIN files f ON f.id = i.file_id WHERE i.id <= ? AND {LIVE_ITEM}"
                " AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.item_id = i.id AND t.model_id = ?)",
                (model_id, last, model_id),
            ).rowcount
        counts["stale"] = conn.execute(
            "UPDATE tasks SET status = 'pending', owner = NULL, lease_until = NULL,"
            " suspect = 0, crashed_workers = NULL,"
            " length = (SELECT embstore_length(f.frames, f.sample_rate, i.start, i.end)"
            "           FROM items i JOIN files f ON f.id = i.file_id WHERE i.id = tasks.item_id)"
            " WHERE model_id = ? AND status = 'stale'",
            (model_id,),
        ).rowcount
        counts["released"] = release_lost(conn, model_id, now)
        counts["retried"] = 0
        if retry_failed:
            counts["retried"] = conn.execute(
                "UPDATE tasks SET status = 'pending', error = NULL, stage = NULL, crashed_workers = NULL"
                " WHERE model_id = ? AND status = 'failed'",
                (model_id,),
            ).rowcount
    return counts


def retry_legacy_environment_failures(conn: sqlite3.Connection, model_id: int) -> int:
    """Back to pending: items an older version failed because the machine lacked a
    package (see LEGACY_ENVIRONMENT_FAILURE). A run's plan calls it once, never a worker
    (a failure of this run is never reset in it)."""
    with immediate(conn):
        return conn.execute(
            "UPDATE tasks SET status = 'pending', error = NULL, stage = NULL, run_id = NULL"
            f" WHERE model_id = ? AND status = 'failed' AND {LEGACY_ENVIRONMENT_FAILURE}",
            (model_id,),
        ).rowcount


def high_water_item(conn: sqlite3.Connection, model_id: int) -> int:
    """The highest item id that has a task for the model (new items lie above it)."""
    return int(scalar(conn, "SELECT coalesce(max(item_id), 0) FROM tasks WHERE model_id = ?", (model_id,)))


def _has_gaps(conn: sqlite3.Connection, model_id: int) -> bool:
    """Cheap check whether some live item below the high-water mark lacks a task."""
    items = scalar(conn, "SELECT count(*) FROM items i WHERE " + LIVE_ITEM)
    tasks = scalar(
        conn, f"SELECT count(*) FROM tasks t JOIN items i ON i.id = t.item_id WHERE t.model_id = ? AND {LIVE_ITEM}",
        (model_id,),
    )
    return tasks < items


def mark_items_stale(conn: sqlite3.Connection, item_id: int) -> int:
    """An item's audio or span changed: every model's embedding of it must be redone, and
    what was derived from its audio (speech regions, diarization) is forgotten."""
    conn.execute("DELETE FROM speech WHERE item_id = ?", (item_id,))
    conn.execute("DELETE FROM diarization WHERE item_id = ?", (item_id,))
    return conn.execute(
        "UPDATE tasks SET status = 'stale', error = NULL, stage = NULL WHERE item_id = ?"
        " AND status IN ('done', 'failed', 'claimed', 'pending')",
        (item_id,),
    ).rowcount


# -- claims and leases --------------------------------------------------------------------


def _release(conn: sqlite3.Connection, where: str, params: Sequence[Any]) -> int:
    return conn.execute(
        f"UPDATE tasks SET status = 'pending', owner = NULL, lease_until = NULL WHERE status = 'claimed' AND {where}",
        tuple(params),
    ).rowcount


def release_lost(conn: sqlite3.Connection, model_id: int, now: float) -> int:
    """Back to pending: claims whose lease ran out, those of dead processes on this host,
    and those of cluster actors whose run's driver is gone."""
    released = _release(conn, "model_id = ? AND lease_until < ?", (model_id, now))
    for owner in claim_owners(conn, model_id):
        if owner and (owner_is_dead(owner) or ray_run_is_gone(conn, owner)):
            released += _release(conn, "owner = ?", (owner,))
    return released


def ray_owner(node: str, actor: str, run_id: int) -> str:
    """The owner of a cluster actor's claims: ray:<node>:<actor>:<run>."""
    return f"ray:{node}:{actor}:{run_id}"


def ray_run_is_gone(conn: sqlite3.Connection, owner: str) -> bool:
    """True for a cluster actor's owner whose run has ended, or whose driver process on
    this host no longer runs (its actors died with it: Ray kills what a dead driver owned)."""
    if not owner.startswith("ray:"):
        return False
    try:
        run_id = int(owner.rsplit(":", 1)[1])
    except ValueError:
        return False
    run = conn.execute("SELECT host, pid, pid_start, status FROM runs WHERE id = ?", (run_id,)).fetchone()
    if run is None or run[3] != "running":
        return True
    return run[0] == HOST and bool(run[1]) and not is_running(int(run[1]), run[2])


def claim_owners(conn: sqlite3.Connection, model_id: int) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT owner FROM tasks WHERE model_id = ? AND status = 'claimed'", (model_id,)
    )]


def claim_batch(
    conn: sqlite3.Connection,
    model_id: int,
    owner: str,
    lease_seconds: float,
    max_items: int,
    max_frames: int,
    order: str = "length",
    only_item_ids: Sequence[int] | None = None,
) -> list[sqlite3.Row]:
    """Atomically take up to `max_items` pending tasks (about `max_frames` frames in all);
    rows of CLAIM_COLUMNS.

    order="length" takes the shortest pending lengths first, so equal lengths come
    together (exact batching); order="item" takes scan order, which keeps a speaker's
    rows together in the store. `only_item_ids` restricts the claim to those items.
    Suspects (see `record_death`) are never part of a batch: `claim_suspect` takes them.
    """
    order_sql = "t.length, t.item_id" if order == "length" else "t.item_id"
    restrict, extra = "", ()
    if only_item_ids is not None:
        restrict, extra = f" AND t.item_id IN ({marks(len(only_item_ids))})", tuple(only_item_ids)
    now = time.time()
    with immediate(conn):
        _release(conn, "model_id = ? AND lease_until < ?", (model_id, now))
        candidates = conn.execute(
            "SELECT t.id, t.length FROM tasks t JOIN items i ON i.id = t.item_id"
            f" WHERE t.model_id = ? AND t.status = 'pending' AND t.suspect = 0 AND {LIVE_ITEM}{restrict}"
            f" ORDER BY {order_sql} LIMIT ?",
            (model_id, *extra, max_items),
        ).fetchall()
        chosen, frames = [], 0
        for task_id, length in candidates:
            if chosen and frames + max(length, 1) > max_frames:
                break
            chosen.append(task_id)
            frames += max(length, 1)
        if not chosen:
            return []
        conn.execute(
            "UPDATE tasks SET status = 'claimed', owner = ?, lease_until = ?, attempts = attempts + 1"
            f" WHERE id IN ({marks(len(chosen))})",
            (owner, now + lease_seconds, *chosen),
        )
        return conn.execute(
            f"SELECT {CLAIM_COLUMNS} FROM tasks t JOIN items i ON i.id = t.item_id JOIN files f ON f.id = i.file_id"
            f" JOIN roots r ON r.id = f.root_id WHERE t.id IN ({marks(len(chosen))}) ORDER BY {order_sql}",
            chosen,
        ).fetchall()


def claim_suspect(conn: sqlite3.Connection, model_id: int, owner: str, lease_seconds: float) -> list[sqlite3.Row]:
    """Take one suspect task alone (rows of CLAIM_COLUMNS; [] when there is none): if it
    kills its worker again, the death is its own."""
    now = time.time()
    with immediate(conn):
        row = conn.execute(
            "SELECT t.id FROM tasks t JOIN items i ON i.id = t.item_id WHERE t.model_id = ? AND t.status = 'pending'"
            # those that never killed a worker alone first: they are most likely innocent
            f" AND t.suspect = 1 AND {LIVE_ITEM} ORDER BY t.crashed_workers IS NOT NULL, t.item_id LIMIT 1",
            (model_id,),
        ).fetchone()
        if row is None:
            return []
        conn.execute(
            "UPDATE tasks SET status = 'claimed', owner = ?, lease_until = ?, attempts = attempts + 1 WHERE id = ?",
            (owner, now + lease_seconds, row[0]),
        )
        return conn.execute(
            f"SELECT {CLAIM_COLUMNS} FROM tasks t JOIN items i ON i.id = t.item_id JOIN files f ON f.id = i.file_id"
            " JOIN roots r ON r.id = f.root_id WHERE t.id = ?",
            (row[0],),
        ).fetchall()


# solo deaths on this many different workers make an item a poison item
CRASHES_TO_FAIL = 2


def record_death(
    conn: sqlite3.Connection, owner: str, worker: str, reason: str, run_id: int | None, prefix: bool = False
) -> tuple[int, int]:
    """A worker died holding claims (its process was killed, not the whole run): count
    the death against what it held, then give those tasks back. `owner` is the exact
    owner, or with `prefix` the start of it (a local process: host:pid:).

    Held with others, each task becomes a suspect, claimed alone from then on. Held
    alone, the death is the task's own: `worker` joins its crashed workers, and after
    CRASHES_TO_FAIL different ones the task fails with stage 'crash'. Returns (new
    suspects, tasks failed)."""
    match = "substr(owner, 1, ?) = ?" if prefix else "? > 0 AND owner = ?"
    with immediate(conn):
        held = conn.execute(
            f"SELECT id, crashed_workers FROM tasks WHERE status = 'claimed' AND {match}", (len(owner), owner)
        ).fetchall()
        if len(held) != 1:
            conn.executemany("UPDATE tasks SET suspect = 1 WHERE id = ?", [(r[0],) for r in held])
            _release(conn, match, (len(owner), owner))
            return len(held), 0
        task_id, crashed = held[0]
        workers = list(dict.fromkeys((json.loads(crashed) if crashed else []) + [worker]))
        if len(workers) >= CRASHES_TO_FAIL:
            conn.execute(
                "UPDATE tasks SET status = 'failed', owner = NULL, lease_until = NULL, stage = 'crash', error = ?,"
                " crashed_workers = ?, run_id = ? WHERE id = ?",
                (f"killed {len(workers)} different workers processing it alone (last: {reason})"[:2000],
                 json.dumps(workers), run_id, task_id),
            )
            return 0, 1
        conn.execute("UPDATE tasks SET suspect = 1, crashed_workers = ? WHERE id = ?", (json.dumps(workers), task_id))
        _release(conn, "id = ?", (task_id,))
        return 1, 0


def renew_lease(conn: sqlite3.Connection, owner: str, lease_seconds: float) -> int:
    with immediate(conn):
        return conn.execute(
            "UPDATE tasks SET lease_until = ? WHERE owner = ? AND status = 'claimed'",
            (time.time() + lease_seconds, owner),
        ).rowcount


def release_claims(conn: sqlite3.Connection, owner: str) -> int:
    """Give back everything `owner` still holds (a clean stop, or a worker found dead)."""
    with immediate(conn):
        return _release(conn, "owner = ?", (owner,))


def release_owners_like(conn: sqlite3.Connection, pattern: str) -> int:
    """Give back the claims of every owner matching a LIKE pattern (e.g. one run's actors)."""
    with immediate(conn):
        return _release(conn, "owner LIKE ?", (pattern,))


def roots_with_open_work(conn: sqlite3.Connection, model_id: int) -> list[str]:
    """The scan roots that hold files this model still has to embed (what a cluster
    node must be able to read)."""
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT r.path FROM tasks t JOIN items i ON i.id = t.item_id JOIN files f ON f.id = i.file_id"
        f" JOIN roots r ON r.id = f.root_id WHERE t.model_id = ? AND t.status IN ({marks(len(OPEN_STATES))})"
        f" AND {LIVE_ITEM} ORDER BY r.path",
        (model_id, *OPEN_STATES),
    )]


# -- progress -----------------------------------------------------------------------------


def pending_summary(conn: sqlite3.Connection, model_id: int) -> tuple[int, float]:
    """(tasks left to do, their seconds of audio)."""
    n, secs = conn.execute(
        "SELECT count(*), coalesce(sum(i.duration), 0) FROM tasks t JOIN items i ON i.id = t.item_id"
        f" WHERE t.model_id = ? AND t.status IN ({marks(len(OPEN_STATES))}) AND {LIVE_ITEM}",
        (model_id, *OPEN_STATES),
    ).fetchone()
    return int(n), float(secs)


def claimable_count(conn: sqlite3.Connection, model_id: int) -> int:
    """Tasks a worker could claim right now (pending or stale: nobody holds them)."""
    return int(scalar(
        conn, f"SELECT count(*) FROM tasks t JOIN items i ON i.id = t.item_id WHERE t.model_id = ?"
        f" AND t.status IN ('pending', 'stale') AND {LIVE_ITEM}", (model_id,),
    ))


def has_open_work(conn: sqlite3.Connection, model_id: int, retry_failed: bool) -> bool:
    """Whether a run could find anything to do, answered from the tasks alone."""
    states = OPEN_STATES + (("failed",) if retry_failed else ())
    if conn.execute(
        f"SELECT 1 FROM tasks WHERE model_id = ? AND status IN ({marks(len(states))}) LIMIT 1", (model_id, *states)
    ).fetchone():
        return True
    if conn.execute(
        f"SELECT 1 FROM tasks WHERE model_id = ? AND status = 'failed' AND {LEGACY_ENVIRONMENT_FAILURE} LIMIT 1",
        (model_id,),
    ).fetchone():
        return True
    last = high_water_item(conn, model_id)
    if conn.execute(f"SELECT 1 FROM items i WHERE i.id > ? AND {LIVE_ITEM} LIMIT 1", (last,)).fetchone():
        return True
    return _has_gaps(conn, model_id)  # an item below the mark without a task (it came back)


# -- dedup --------------------------------------------------------------------------------


def rows_of_identical_audio(
    conn: sqlite3.Connection, model_id: int, keys: Iterable[tuple[str, float | None, float | None]]
) -> dict[tuple[str, float | None, float | None], tuple[int, int | None]]:
    """{(content hash, start, end): (row, row count) of a done task of that audio and
    span} for the keys that have one: items whose bytes and span are identical share
    their embeddings."""
    wanted = list(dict.fromkeys(keys))
    by_hash: dict[str, list[tuple]] = {}
    for key in wanted:
        by_hash.setdefault(key[0], []).append(key)
    found: dict[tuple[str, float | None, float | None], tuple[int, int | None]] = {}
    for r in select_in(
        conn,
        # CROSS JOIN keeps this order (hash index first): left to SQLite, it walks every
        # done row of the model instead, a cost that grows with the store
        "SELECT f.content_hash, i.start, i.end, t.row, t.row_count FROM files f CROSS JOIN items i ON i.file_id = f.id"
        " CROSS JOIN tasks t ON t.item_id = i.id WHERE f.content_hash IN ({marks})"
        " AND t.model_id = ? AND t.status = 'done' AND t.row IS NOT NULL",
        list(by_hash), params_after=(model_id,),
    ):
        key = (r[0], r[1], r[2])
        if key in by_hash.get(r[0], ()) and key not in found:
            found[key] = (int(r[3]), r[4])
    return found


# -- the writer's commit ------------------------------------------------------------------


def still_held(conn: sqlite3.Connection, pairs: Iterable[tuple[int, str]]) -> set[tuple[int, str]]:
    """The (task id, owner) pairs whose task that owner still holds."""
    ids = sorted({task_id for task_id, _ in pairs})
    return {
        (r[0], r[1])
        for r in select_in(conn, "SELECT id, owner FROM tasks WHERE id IN ({marks}) AND status = 'claimed'", ids)
    }


def committed_rows(conn: sqlite3.Connection, model_id: int) -> int:
    return int(scalar(conn, "SELECT rows FROM models WHERE id = ?", (model_id,)))


def set_committed_rows(conn: sqlite3.Connection, model_id: int, rows: int) -> None:
    conn.execute("UPDATE models SET rows = ? WHERE id = ?", (rows, model_id))


def mark_done(
    conn: sqlite3.Connection, done: Sequence[tuple[int, int, int | None, int, str | None]], run_id: int | None
) -> None:
    """(task id, row, row count, item id, content hash) per finished task (row count None:
    one row); the file's hash is kept for dedup."""
    now = time.time()
    conn.executemany(
        "UPDATE tasks SET status = 'done', row = ?, row_count = ?, owner = NULL, lease_until = NULL, error = NULL,"
        " stage = NULL, done_at = ?, run_id = ? WHERE id = ?",
        [(row, count, now, run_id, task_id) for task_id, row, count, _, _ in done],
    )
    conn.executemany(
        "UPDATE files SET content_hash = ? WHERE id = (SELECT file_id FROM items WHERE id = ?)",
        [(digest, item_id) for _, _, _, item_id, digest in done if digest],
    )


def mark_failed(conn: sqlite3.Connection, failed: Sequence[tuple[int, str, str]], run_id: int | None) -> None:
    """(task id, stage, error) per failed task."""
    conn.executemany(
        "UPDATE tasks SET status = 'failed', owner = NULL, lease_until = NULL, stage = ?, error = ?,"
        " run_id = ? WHERE id = ?",
        [(stage, error[:2000], run_id, task_id) for task_id, stage, error in failed],
    )


__all__ = [
    "HOST", "new_owner", "process_owner", "owner_is_dead", "claim_is_live", "describe_owner", "refresh_tasks", "release_lost", "claim_batch", "renew_lease",
    "release_claims", "pending_summary", "claimable_count", "retry_legacy_environment_failures", "has_open_work", "rows_of_identical_audio",
    "claim_suspect", "record_death", "ray_owner", "ray_run_is_gone", "roots_with_open_work",
    "still_held", "committed_rows", "set_committed_rows", "mark_done", "mark_failed", "mark_items_stale",
]
