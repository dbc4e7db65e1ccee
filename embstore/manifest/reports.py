"""What a store holds and what went wrong: `status` and `errors` reports."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from typing import Any, Iterable

from embstore.manifest.diarization import diarized_count
from embstore.manifest import registry
from embstore.manifest.connection import LIVE_ITEM, scalar, select_in
from embstore.manifest.registry import ModelRecord
from embstore.manifest.runs import last_run
from embstore.manifest.selection import Selection
from embstore.manifest.tasks import claim_is_live, describe_owner
from embstore.outcome import Outcome

TASK_STATES = ("pending", "claimed", "done", "failed", "stale")
# what `status` shows of a model's last run
LAST_RUN_KEYS = ("batching", "runtime", "features", "mean_batch_items", "padding_overhead", "items_per_second",
                 "x_realtime", "done", "failed", "devices", "workers_per_node")

_QUOTED_PATH = re.compile(r"""(['"])[^'"]*[/\\][^'"]*\1""")
_BARE_PATH = re.compile(r"(?<![\w.])/[^\s:;,'\"()]+")
_BIG_NUMBER = re.compile(r"\d{3,}")


def reason_key(message: str | None) -> str:
    """A failure message without what makes each one unique (paths, counts), so that
    failures group by their cause."""
    text = _QUOTED_PATH.sub("'...'", message or "?")
    text = _BARE_PATH.sub("<path>", text)
    return _BIG_NUMBER.sub("N", text)


def group_reasons(rows: Iterable[tuple[str | None, int]], top: int = 20) -> dict[str, int]:
    """{reason: count} of the `top` most frequent reasons, messages grouped by `reason_key`."""
    grouped: dict[str, int] = {}
    for message, n in rows:
        key = reason_key(message)
        grouped[key] = grouped.get(key, 0) + n
    return dict(sorted(grouped.items(), key=lambda kv: -kv[1])[:top])


def model_progress(conn: sqlite3.Connection, row: ModelRecord) -> dict[str, Any]:
    """Task counts per state (live items only), failure reasons and the last run of one model."""
    counts: dict[str, Any] = dict.fromkeys(TASK_STATES, 0)
    for state, n in conn.execute(
        "SELECT t.status, count(*) FROM tasks t JOIN items i ON i.id = t.item_id"
        f" WHERE t.model_id = ? AND {LIVE_ITEM} GROUP BY t.status",
        (row.id,),
    ):
        counts[state] = n
    # items scanned since the last extract have no task yet: they are pending too
    counts["pending"] += scalar(
        conn,
        f"SELECT count(*) FROM items i WHERE {LIVE_ITEM} AND NOT EXISTS"
        " (SELECT 1 FROM tasks t WHERE t.item_id = i.id AND t.model_id = ?)",
        (row.id,),
    )
    counts.update({"batching": row.batching, "dim": row.dim, "fingerprint": row.fingerprint, "rows": row.rows,
                   "kind": row.kind})
    if row.windowed:
        counts["diarized"] = diarized_count(conn, row.id)
    counts["failures_by_reason"] = group_reasons(conn.execute(
        # live items only, like the counts above: the reasons add up to "failed"
        "SELECT coalesce(t.stage, '?') || ': ' || coalesce(t.error, '?'), count(*) FROM tasks t"
        " JOIN items i ON i.id = t.item_id WHERE t.model_id = ? AND t.status = 'failed'"
        f" AND {LIVE_ITEM} GROUP BY 1 ORDER BY 2 DESC LIMIT 100000",
        (row.id,),
    ))
    last = last_run(conn, row.id)
    if last is not None:
        run = json.loads(last["summary"])
        # how the last run batched (masked / equal / any), on what runtime, how well
        counts["last_run"] = {key: run.get(key) for key in LAST_RUN_KEYS} | {
            "status": last["status"], "ended_at": last["ended_at"],
        }
    return counts


def status(conn: sqlite3.Connection, where: str) -> dict[str, Any]:
    """Files, items, speakers, audio and each model's progress."""
    report: dict[str, Any] = {
        "store": where,
        "files": scalar(conn, "SELECT count(*) FROM files WHERE status = 'ok'"),
        "items": scalar(conn, f"SELECT count(*) FROM items i WHERE {LIVE_ITEM}"),
        "speakers": scalar(conn, f"SELECT count(DISTINCT speaker) FROM items i WHERE {LIVE_ITEM}"),
        "datasets": scalar(conn, f"SELECT count(DISTINCT dataset) FROM items i WHERE {LIVE_ITEM}"),
        "audio_seconds": round(scalar(conn, f"SELECT coalesce(sum(duration), 0) FROM items i WHERE {LIVE_ITEM}"), 3),
        "scan_failed": scalar(conn, "SELECT count(*) FROM files WHERE status = 'scan_failed'"),
        "removed_files": scalar(conn, "SELECT count(*) FROM files WHERE status = 'removed'"),
        "models": {},
    }
    for row in registry.model_rows(conn):
        report["models"][registry.model_key(conn, row)] = model_progress(conn, row)
    report["scan_failures_by_reason"] = group_reasons(conn.execute(
        "SELECT error, count(*) FROM files WHERE status = 'scan_failed' GROUP BY error ORDER BY 2 DESC LIMIT 100000"
    ))
    return report


def errors(conn: sqlite3.Connection, models: list[ModelRecord]) -> list[dict[str, Any]]:
    """Failed items of the given models, then files whose header could not be read."""
    out: list[dict[str, Any]] = []
    for m in models:
        key = registry.model_key(conn, m)
        for r in conn.execute(
            "SELECT i.uid, r.path AS root, f.path, t.stage, t.error, t.attempts FROM tasks t"
            " JOIN items i ON i.id = t.item_id JOIN files f ON f.id = i.file_id JOIN roots r ON r.id = f.root_id"
            f" WHERE t.model_id = ? AND t.status = 'failed' AND {LIVE_ITEM} ORDER BY i.id",
            (m.id,),
        ):
            out.append({
                "id": r["uid"], "path": os.path.join(r["root"], r["path"]), "stage": r["stage"] or "extract",
                "error": r["error"], "attempts": r["attempts"], "model": key,
            })
    for r in conn.execute(
        "SELECT r.path AS root, f.path, f.error FROM files f JOIN roots r ON r.id = f.root_id"
        " WHERE f.status = 'scan_failed' ORDER BY f.id"
    ):
        path = os.path.join(r["root"], r["path"])
        out.append({"id": None, "path": path, "stage": "scan", "error": r["error"], "attempts": 0, "model": None})
    return out


def coverage(conn: sqlite3.Connection, model_id: int, selection: Selection = Selection(), model_key: str = "",
             noun: str = "items", count_waiting: bool = True) -> Outcome:
    """How far a model's work over the selected items is: done, failed (with the most
    common reason), and left, with why (not extracted yet, or held by a run that still
    runs). `count_waiting=False`: items nobody holds are not counted as left."""
    conditions, params = selection.where()
    where = " AND ".join(conditions)

    def grouped(select: str, join: str, extra: str, groups: str) -> list[sqlite3.Row]:
        """`select` over the selected items (the ids matched in chunks), grouped."""
        sql = f"SELECT {select} FROM items i {join} WHERE {where}{extra}"
        if selection.ids is None:
            return conn.execute(f"{sql} GROUP BY {groups}", [model_id, *params]).fetchall()
        return select_in(conn, f"{sql} AND i.uid IN ({{marks}}) GROUP BY {groups}",
                         list(dict.fromkeys(selection.ids)), params_before=[model_id, *params])

    rows = grouped("coalesce(t.status, 'none'), t.owner, t.lease_until, count(*)",
                   "LEFT JOIN tasks t ON t.item_id = i.id AND t.model_id = ?", "", "1, 2, 3")
    done = failed = waiting = 0
    held: dict[str, int] = {}
    for state, owner, lease_until, n in rows:
        if state == "done":
            done += n
        elif state == "failed":
            failed += n
        elif state == "claimed" and owner and claim_is_live(conn, owner, lease_until):
            held[owner] = held.get(owner, 0) + n
        else:
            waiting += n
    reasons = []
    if held:
        holders = sorted({describe_owner(o) for o in held})
        reasons.append(f"{sum(held.values())} held by another run still running ({', '.join(holders[:3])}"
                       f"{', ...' if len(holders) > 3 else ''}); it finishes them, or run this command again"
                       " once it has ended")
    if not count_waiting:
        waiting = 0
    if waiting:
        with_model = f" with {model_key}" if model_key else ""
        reasons.append(f"{waiting} not extracted yet{with_model} (run `embstore extract`)")
    reason = None
    if failed:
        top = group_reasons(grouped("coalesce(t.stage, '?') || ': ' || coalesce(t.error, '?'), count(*)",
                                    "JOIN tasks t ON t.item_id = i.id AND t.model_id = ?", " AND t.status = 'failed'",
                                    "1"), top=1)
        reason = next(iter(top), None)
    return Outcome(done=done, failed=failed, left=waiting + sum(held.values()), why_left="; ".join(reasons),
                   reason=reason, noun=noun)
