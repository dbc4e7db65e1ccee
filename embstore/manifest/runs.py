"""The `runs` table: what each `extract` did, and runs whose process died."""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from embstore.manifest.connection import immediate, utcnow
from embstore.processes import HOST, is_running, own_start_mark

CRASHED = "the process died without recording its end (kill -9, OOM, power loss)"


def start_run(conn: sqlite3.Connection, model_id: int, options: dict[str, Any]) -> int:
    """Record a new running run (this host, this pid); runs of this host whose process is
    gone are marked crashed first."""
    with immediate(conn):
        for old_id, old_pid, old_mark in conn.execute(
            "SELECT id, pid, pid_start FROM runs WHERE status = 'running' AND host = ?", (HOST,)
        ).fetchall():
            if old_pid and not is_running(int(old_pid), old_mark):
                conn.execute(
                    "UPDATE runs SET status = 'crashed', summary = ? WHERE id = ?",
                    (json.dumps({"error": CRASHED}), old_id),
                )
        return int(conn.execute(
            "INSERT INTO runs (model_id, host, pid, pid_start, options, started_at, status)"
            " VALUES (?, ?, ?, ?, ?, ?, 'running')",
            (model_id, HOST, os.getpid(), own_start_mark(), json.dumps(options, sort_keys=True, default=str), utcnow()),
        ).lastrowid)


def end_run(conn: sqlite3.Connection, run_id: int, status: str, summary: dict[str, Any]) -> None:
    with immediate(conn):
        conn.execute(
            "UPDATE runs SET ended_at = ?, status = ?, items_done = ?, items_failed = ?, audio_seconds = ?,"
            " summary = ? WHERE id = ?",
            (utcnow(), status, summary.get("done", 0), summary.get("failed", 0), summary.get("audio_seconds", 0.0),
             json.dumps(summary, default=str), run_id),
        )


def last_run(conn: sqlite3.Connection, model_id: int) -> sqlite3.Row | None:
    """The latest run of a model that recorded a summary."""
    return conn.execute(
        "SELECT summary, status, ended_at FROM runs WHERE model_id = ? AND summary IS NOT NULL"
        " ORDER BY id DESC LIMIT 1",
        (model_id,),
    ).fetchone()
