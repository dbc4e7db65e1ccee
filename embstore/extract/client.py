"""`ManifestClient`: what a worker asks of the manifest, whatever stands behind it.

A worker never touches SQLite itself. It claims batches, keeps their lease alive, gives
them back, asks once per claim which of its items' audio is already embedded (dedup),
and refreshes the task list when it runs dry. `SqliteManifestClient` does that against
the store's own `manifest.db` (local processes); a cluster run uses a remote one that
calls the coordinator actor.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

from embstore.extract.messages import ClaimedTask
from embstore.manifest import speech, tasks
from embstore.manifest.connection import connect
from embstore.paths import StorePaths

DedupKey = tuple[str, "float | None", "float | None"]  # (content hash, start, end)
DedupRows = tuple[int, "int | None"]  # (first row, row count; None = one row)


class ManifestClient(ABC):
    """Claims, leases and dedup lookups for one worker (`owner`)."""

    owner: str

    @abstractmethod
    def claim(self, max_items: int, max_frames: int) -> list[ClaimedTask]:
        """Take up to `max_items` pending tasks (about `max_frames` frames); [] when none."""

    def claim_suspect(self, max_frames: int) -> list[ClaimedTask]:
        """One suspect task (its batch's worker died), alone; [] when none (the default)."""
        return []

    @abstractmethod
    def renew(self) -> None:
        """Extend the lease of everything this owner holds."""

    @abstractmethod
    def release(self) -> int:
        """Give back everything this owner still holds."""

    @abstractmethod
    def refresh(self) -> None:
        """Bring the task list up to date (items scanned meanwhile, leases run out)."""

    @abstractmethod
    def dedup_rows(self, keys: Sequence[DedupKey]) -> dict[DedupKey, DedupRows]:
        """(row, row count) of done tasks of identical audio and span, for the keys that have one."""

    def speech_regions(self, item_ids: Sequence[int], vad_key: str) -> dict[int, list[tuple[float, float]]]:
        """Stored speech regions of these items under this VAD; the default knows none
        (the loader runs the VAD)."""
        return {}

    def close(self) -> None:
        """Free connections; the default holds none."""


def to_claimed(row: Sequence[Any]) -> ClaimedTask:
    """A `tasks.CLAIM_COLUMNS` row as the message a worker gets."""
    task_id, item_id, uid, root, path, start, end, duration, length = row
    return ClaimedTask(task_id, item_id, uid, os.path.join(root, path), start, end, duration or 0.0, length)


class ClaimBudget:
    """`--limit`: items the whole run may still claim, shared by its local workers
    (a multiprocessing.Value("q") of items claimed so far)."""

    def __init__(self, limit: int, claimed: Any):
        self.limit = limit
        self.claimed = claimed

    def take(self, want: int, claim: Callable[[int], list[ClaimedTask]]) -> list[ClaimedTask]:
        with self.claimed.get_lock():
            room = min(want, self.limit - self.claimed.value)
            if room <= 0:
                return []
            got = claim(room)
            self.claimed.value += len(got)
            return got


class SqliteManifestClient(ManifestClient):
    """The store's manifest.db, one connection per thread (the feeder and lease threads
    call it concurrently)."""

    def __init__(
        self,
        store_path: str | os.PathLike,
        model_id: int,
        owner: str,
        lease_seconds: float,
        order: str,
        feature_length: Callable[[int], int],
        sample_rate: int,
        budget: ClaimBudget | None = None,
    ):
        self.db_path = StorePaths.of(store_path).manifest
        self.model_id = model_id
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.order = order
        self.feature_length = feature_length
        self.sample_rate = sample_rate
        self.budget = budget
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.db_path)
            with self._lock:
                self._opened.append(conn)
        return conn

    def _claim(self, max_items: int, max_frames: int) -> list[ClaimedTask]:
        rows = tasks.claim_batch(self.conn, self.model_id, self.owner, self.lease_seconds, max_items, max_frames, self.order)
        return [to_claimed(r) for r in rows]

    def claim(self, max_items: int, max_frames: int) -> list[ClaimedTask]:
        if self.budget is None:
            return self._claim(max_items, max_frames)
        return self.budget.take(max_items, lambda room: self._claim(room, max_frames))

    def claim_suspect(self, max_frames: int) -> list[ClaimedTask]:
        def take(room: int) -> list[ClaimedTask]:
            rows = tasks.claim_suspect(self.conn, self.model_id, self.owner, self.lease_seconds)
            return [to_claimed(r) for r in rows]

        return take(1) if self.budget is None else self.budget.take(1, take)

    def renew(self) -> None:
        tasks.renew_lease(self.conn, self.owner, self.lease_seconds)

    def release(self) -> int:
        return tasks.release_claims(self.conn, self.owner)

    def refresh(self) -> None:
        tasks.refresh_tasks(self.conn, self.model_id, self.feature_length, self.sample_rate)

    def dedup_rows(self, keys: Sequence[DedupKey]) -> dict[DedupKey, DedupRows]:
        return tasks.rows_of_identical_audio(self.conn, self.model_id, keys)

    def speech_regions(self, item_ids: Sequence[int], vad_key: str) -> dict[int, list[tuple[float, float]]]:
        return speech.regions_of(self.conn, item_ids, vad_key)

    def close(self) -> None:
        with self._lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()
