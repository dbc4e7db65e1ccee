"""The one writer: appends embeddings to Zarr, then marks their tasks done.

Every flush is one BEGIN IMMEDIATE transaction that (1) keeps only results whose task
the sending worker still holds, (2) writes their vectors at the model's row count,
(3) marks them done and advances the row count, then commits. A crash before the
commit leaves rows past the count, which the next flush overwrites. Holding the
SQLite write lock across the Zarr write also serialises two `extract` runs on one
store, so their rows never interleave inside a chunk.

`ZarrWriter` knows nothing of processes or queues (write_batch / flush / close);
`writer_main` is the local writer process around it.
"""

from __future__ import annotations

import errno
import os
import queue
import signal
import sqlite3
import time
from typing import Any

import numpy as np

from embstore.arrays.zarr_arrays import CHUNK_ROWS, ModelArrays
from embstore.extract.messages import (
    ItemFailure, ItemOutcome, ItemResult, ResultBatch, WorkerDied, WorkerFinished, WriterFailed, WriterFinished,
    Written,
)
from embstore.manifest import speech as speech_regions
from embstore.manifest import tasks
from embstore.manifest.connection import connect, immediate
from embstore.manifest.registry import model_row
from embstore.paths import StorePaths
from embstore.processes import adopt_environment, die_with_parent

FLUSH_SECONDS = 1.0


class ZarrWriter:
    """Buffers results and commits them; used inside the writer process (and tests)."""

    def __init__(self, store_path: str | os.PathLike, model_id: int, run_id: int | None):
        paths = StorePaths.of(store_path)
        self.store_path = str(paths.root)
        self.conn = connect(paths.manifest)
        model = model_row(self.conn, model_id)
        self.model_id = model_id
        self.run_id = run_id
        self.arrays = ModelArrays(paths.arrays, model.array_path, model.dim, spans=model.windowed)
        self.results: list[ItemResult] = []
        self.failures: list[ItemFailure] = []
        self.totals = WriterFinished(0, 0, 0, 0.0, 0)
        self.last_flush = time.monotonic()
        # tests set this to meet a full disk after N rows without filling a real one
        self._fail_after_rows = int(os.environ.get("EMBSTORE_FAULT_ENOSPC_AFTER_ROWS", "-1"))

    def add(self, outcome: ItemOutcome) -> None:
        if isinstance(outcome, ItemResult):
            self.results.append(outcome)
        else:
            self.failures.append(outcome)

    def write_batch(self, outcomes: list[ItemOutcome]) -> None:
        for outcome in outcomes:
            self.add(outcome)

    def due(self) -> bool:
        if not (self.results or self.failures):
            return False
        if self.totals.flushes == 0:
            return True  # a run's first results are committed at once: progress shows early
        buffered = sum(r.rows for r in self.results)
        return buffered >= CHUNK_ROWS or time.monotonic() - self.last_flush >= FLUSH_SECONDS

    def flush(self) -> Written:
        """Commit everything buffered; what this flush committed."""
        self.last_flush = time.monotonic()
        if not self.results and not self.failures:
            return Written(0, 0, 0.0)
        results, failures = self.results, self.failures
        conn = self.conn
        with immediate(conn):
            held = tasks.still_held(conn, [(r.task_id, r.owner) for r in results] + [(f.task_id, f.owner) for f in failures])
            fresh = [r for r in results if (r.task_id, r.owner) in held and r.vector is not None]
            dups = [r for r in results if (r.task_id, r.owner) in held and r.vector is None]
            base = tasks.committed_rows(conn, self.model_id)
            windows = self.arrays.spans  # a window model: each result owns its windows' rows
            counts = [r.rows for r in fresh]
            starts = base + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int) if fresh else []
            added = int(sum(counts))
            if fresh:
                self._check_fault(base + added)
                self.arrays.write_rows(
                    base, np.concatenate([r.vector.reshape(-1, self.arrays.dim) for r in fresh]),
                    np.repeat(np.array([r.item_id for r in fresh], dtype=np.int64), counts),
                    np.concatenate([r.spans for r in fresh]) if windows else None,
                )
            done = [(int(row), n if windows else None, r) for row, n, r in zip(starts, counts, fresh)]
            done += [(r.row, r.row_count, r) for r in dups]
            tasks.mark_done(conn, [(r.task_id, row, n, r.item_id, r.content_hash) for row, n, r in done], self.run_id)
            speech_regions.save_regions(conn, [(r.item_id, *r.speech) for _, _, r in done if r.speech is not None])
            if fresh:
                tasks.set_committed_rows(conn, self.model_id, base + added)
            failed = [f for f in failures if (f.task_id, f.owner) in held]
            tasks.mark_failed(conn, [(f.task_id, f.stage, f.error) for f in failed], self.run_id)
        self.results, self.failures = [], []
        written = Written(len(done), len(failed), sum(r.seconds for _, _, r in done))
        t = self.totals
        self.totals = WriterFinished(
            t.done + written.done, t.failed + written.failed,
            t.dropped + len(results) + len(failures) - written.done - written.failed,
            t.seconds + written.seconds, t.flushes + 1,
        )
        return written

    def release(self, owner: str) -> int:
        """Give back what `owner` still holds (after its results were flushed)."""
        return tasks.release_claims(self.conn, owner)

    def died(self, death: WorkerDied) -> Written:
        """A worker died mid-run: commit what it sent, count the death against what it
        still held (suspects, poison items) and give that back. Returns the flush, with
        the items that failed as poison added to its failures."""
        written = self.flush()
        _, failed = tasks.record_death(self.conn, death.owner, death.worker, death.reason, self.run_id, death.prefix)
        if failed:
            t = self.totals
            self.totals = WriterFinished(t.done, t.failed + failed, t.dropped, t.seconds, t.flushes)
            written = Written(written.done, written.failed + failed, written.seconds)
        return written

    def _check_fault(self, rows_after: int) -> None:
        if 0 <= self._fail_after_rows < rows_after:
            raise OSError(errno.ENOSPC, "No space left on device (injected by EMBSTORE_FAULT_ENOSPC_AFTER_ROWS)")

    def close(self) -> None:
        self.conn.close()


def writer_failure(exc: BaseException, store_path: str) -> WriterFailed:
    """The one line a supervisor shows for a writer that cannot go on."""
    if isinstance(exc, OSError):
        reason = "disk full" if exc.errno == errno.ENOSPC else "cannot write embeddings"
        return WriterFailed(f"{reason}: {exc.strerror or exc} ({store_path}); nothing half-written, run again once fixed")
    if isinstance(exc, sqlite3.OperationalError):
        reason = "disk full" if "full" in str(exc) else "cannot update the manifest"
        return WriterFailed(f"{reason}: SQLite says {exc} ({store_path}); nothing half-written, run again once fixed")
    return WriterFailed(f"writer failed: {type(exc).__name__}: {exc}")


def writer_main(store_path: str, model_id: int, run_id: int | None, inbox: Any, progress: Any, n_workers: int,
                env: dict[str, str] | None = None) -> None:
    """Writer process: drain `inbox` until every worker said it is finished; `env`: the
    parent's environment."""
    die_with_parent()
    if env is not None:
        adopt_environment(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates a clean stop
    writer = ZarrWriter(store_path, model_id, run_id)
    finished: set[int] = set()  # worker indexes; the parent reports dead workers too

    def flush() -> None:
        written = writer.flush()
        if written.done or written.failed:
            progress.put(written)

    try:
        while len(finished) < n_workers:
            try:
                message = inbox.get(timeout=0.2)
            except queue.Empty:
                message = None
            if isinstance(message, ResultBatch):
                writer.write_batch(message.outcomes)
            elif isinstance(message, WorkerFinished):
                finished.add(message.index)
                if message.owner is not None:
                    # commit what that worker sent, then give back what it still holds
                    flush()
                    writer.release(message.owner)
            elif isinstance(message, WorkerDied):
                finished.add(message.index)
                written = writer.died(message)
                if written.done or written.failed:
                    progress.put(written)
            if len(finished) >= n_workers or writer.due():
                flush()
        flush()
        progress.put(writer.totals)
    except Exception as exc:  # reported to the parent, which stops the run cleanly
        progress.put(writer_failure(exc, store_path))
    finally:
        writer.close()
