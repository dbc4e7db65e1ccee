"""The one writer: appends embeddings to Zarr, then marks their tasks done.

Every flush is one BEGIN IMMEDIATE transaction that (1) keeps only results whose task
the sending worker still holds, (2) writes their vectors at the model's row count,
(3) marks them done and advances the row count, then commits. A crash before the
commit leaves rows past the count, which the next flush overwrites. Holding the
SQLite write lock across the Zarr write also serialises two `extract` runs on one
store, so their rows never interleave inside a chunk.
"""

from __future__ import annotations

import errno
import os
import queue
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embstore.arrays import CHUNK_ROWS, ModelArrays
from embstore.extract.claims import release_claims
from embstore.store import immediate

FLUSH_SECONDS = 1.0


class DiskFull(Exception):
    pass


@dataclass
class ItemResult:
    task_id: int
    item_id: int
    owner: str
    content_hash: str | None
    seconds: float
    vector: np.ndarray | None = None  # None: a duplicate that reuses `row`
    row: int | None = None


@dataclass
class ItemFailure:
    task_id: int
    owner: str
    stage: str
    error: str


@dataclass
class WriterStats:
    done: int = 0
    failed: int = 0
    dropped: int = 0  # results whose claim had been taken back (lease expired)
    seconds: float = 0.0
    flushes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class ZarrWriter:
    """Buffers results and commits them; used inside the writer process (and tests)."""

    def __init__(self, store_path: str, model_id: int, run_id: int | None):
        from embstore.store import connect

        self.store_path = store_path
        self.conn = connect(os.path.join(store_path, "manifest.db"))
        model = self.conn.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
        self.model_id = model_id
        self.run_id = run_id
        self.arrays = ModelArrays(os.path.join(store_path, "embeddings.zarr"), model["array_path"], model["dim"])
        self.results: list[ItemResult] = []
        self.failures: list[ItemFailure] = []
        self.stats = WriterStats()
        self.last_flush = time.monotonic()
        # tests set this to meet a full disk after N rows without filling a real one
        self._fail_after_rows = int(os.environ.get("EMBSTORE_FAULT_ENOSPC_AFTER_ROWS", "-1"))

    def add(self, message: ItemResult | ItemFailure) -> None:
        if isinstance(message, ItemResult):
            self.results.append(message)
        else:
            self.failures.append(message)

    def due(self) -> bool:
        buffered = sum(1 for r in self.results if r.vector is not None)
        return buffered >= CHUNK_ROWS or (
            (self.results or self.failures) and time.monotonic() - self.last_flush >= FLUSH_SECONDS
        )

    def flush(self) -> tuple[int, int, float]:
        """Commit everything buffered; returns (done, failed, seconds of audio) of this flush."""
        self.last_flush = time.monotonic()
        if not self.results and not self.failures:
            return 0, 0, 0.0
        results, failures = self.results, self.failures
        conn = self.conn
        now = time.time()
        with immediate(conn):
            held = self._still_held(conn, [(r.task_id, r.owner) for r in results] + [(f.task_id, f.owner) for f in failures])
            fresh = [r for r in results if (r.task_id, r.owner) in held and r.vector is not None]
            dups = [r for r in results if (r.task_id, r.owner) in held and r.vector is None]
            base = conn.execute("SELECT rows FROM models WHERE id = ?", (self.model_id,)).fetchone()[0]
            if fresh:
                self._check_fault(base + len(fresh))
                self.arrays.write_rows(
                    base, np.stack([r.vector for r in fresh]), np.array([r.item_id for r in fresh], dtype=np.int64)
                )
            done_rows = [(base + k, r) for k, r in enumerate(fresh)] + [(r.row, r) for r in dups]
            conn.executemany(
                "UPDATE tasks SET status = 'done', row = ?, owner = NULL, lease_until = NULL, error = NULL,"
                " stage = NULL, done_at = ?, run_id = ? WHERE id = ?",
                [(row, now, self.run_id, r.task_id) for row, r in done_rows],
            )
            conn.executemany(
                "UPDATE files SET content_hash = ? WHERE id = (SELECT file_id FROM items WHERE id = ?)",
                [(r.content_hash, r.item_id) for _, r in done_rows if r.content_hash],
            )
            if fresh:
                conn.execute("UPDATE models SET rows = ? WHERE id = ?", (base + len(fresh), self.model_id))
            failed = [f for f in failures if (f.task_id, f.owner) in held]
            conn.executemany(
                "UPDATE tasks SET status = 'failed', owner = NULL, lease_until = NULL, stage = ?, error = ?,"
                " run_id = ? WHERE id = ?",
                [(f.stage, f.error[:2000], self.run_id, f.task_id) for f in failed],
            )
        self.results, self.failures = [], []
        seconds = sum(r.seconds for _, r in done_rows)
        self.stats.done += len(done_rows)
        self.stats.failed += len(failed)
        self.stats.dropped += len(results) + len(failures) - len(done_rows) - len(failed)
        self.stats.seconds += seconds
        self.stats.flushes += 1
        return len(done_rows), len(failed), seconds

    def _still_held(self, conn, pairs: list[tuple[int, str]]) -> set[tuple[int, str]]:
        held: set[tuple[int, str]] = set()
        ids = sorted({task_id for task_id, _ in pairs})
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            marks = ",".join("?" * len(chunk))
            held.update(
                (r[0], r[1])
                for r in conn.execute(
                    f"SELECT id, owner FROM tasks WHERE id IN ({marks}) AND status = 'claimed'", chunk
                )
            )
        return held

    def _check_fault(self, rows_after: int) -> None:
        if 0 <= self._fail_after_rows < rows_after:
            raise OSError(errno.ENOSPC, "No space left on device (injected by EMBSTORE_FAULT_ENOSPC_AFTER_ROWS)")

    def close(self) -> None:
        self.conn.close()


def writer_main(store_path: str, model_id: int, run_id: int | None, inbox, progress, n_workers: int) -> None:
    """Writer process: drain `inbox` until every worker said it is finished."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates a clean stop
    writer = ZarrWriter(store_path, model_id, run_id)
    finished: set[int] = set()  # worker indexes; the parent reports dead workers too
    try:
        while len(finished) < n_workers:
            try:
                message = inbox.get(timeout=0.2)
            except queue.Empty:
                message = None
            if message is not None:
                kind = message[0]
                if kind == "items":
                    for m in message[1]:
                        writer.add(m)
                elif kind == "worker_finished":
                    finished.add(message[1])
                    if len(message) > 2:
                        # commit what that worker sent, then give back what it still holds
                        done, failed, seconds = writer.flush()
                        if done or failed:
                            progress.put(("written", done, failed, seconds))
                        release_claims(writer.conn, message[2])
            if len(finished) >= n_workers or writer.due():
                done, failed, seconds = writer.flush()
                if done or failed:
                    progress.put(("written", done, failed, seconds))
        done, failed, seconds = writer.flush()
        if done or failed:
            progress.put(("written", done, failed, seconds))
        progress.put(("writer_finished", writer.stats.__dict__))
    except OSError as exc:
        reason = "disk full" if exc.errno == errno.ENOSPC else "cannot write embeddings"
        progress.put(("writer_error", f"{reason}: {exc.strerror or exc} ({store_path}); nothing half-written, run again once fixed"))
    except sqlite3.OperationalError as exc:
        reason = "disk full" if "full" in str(exc) else "cannot update the manifest"
        progress.put(("writer_error", f"{reason}: SQLite says {exc} ({store_path}); nothing half-written, run again once fixed"))
    except Exception as exc:  # reported to the parent, which stops the run cleanly
        progress.put(("writer_error", f"writer failed: {type(exc).__name__}: {exc}"))
    finally:
        writer.close()
