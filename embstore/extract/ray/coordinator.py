"""The coordinator: the one process of a cluster run that touches the store.

It runs as a Ray actor pinned to the driver's node (the store stays on that node's local
disk; SQLite never goes over a network filesystem) and serves the workers what
`SqliteManifestClient` serves a local worker: claims, leases, dedup lookups, the model's
fingerprint and the scan roots. It also holds the run's `ZarrWriter`: workers send their
results here and the commit protocol is the local one (a result is written only while
its sender still holds the claim). One actor, one thread, one SQLite connection: claims
and commits never wait on another process's lock.

Nothing here imports Ray: the class is made an actor by `embstore.extract.ray.actors`.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable

from embstore.errors import ExtractionError
from embstore.extract.client import to_claimed
from embstore.extract.messages import (
    ClaimedTask, ClaimRequest, RayModel, CoordinatorProgress, DedupRequest, DedupRows, LeaseRequest, PackedResults,
    WorkerDied, WorkerFinished, Written,
)
from embstore.extract.ray.wire import unpack
from embstore.extract.writer import ZarrWriter, writer_failure
from embstore.manifest import tasks
from embstore.manifest.connection import immediate
from embstore.manifest.registry import model_row
from embstore.models.base import untrimmed_fingerprint
from embstore.paths import StorePaths


def store_identity(store_path: str) -> tuple[str, int, int]:
    """(host, device, inode) of a store's manifest: the same file, not a namesake."""
    st = os.stat(StorePaths.of(store_path).manifest)
    return socket.gethostname(), st.st_dev, st.st_ino


def _normal_priority() -> None:
    """Ray starts actors at niceness 15, behind everything else on the node; the
    coordinator is the one serial process every worker waits on, so it asks for the
    normal priority back (where the node lets it: it needs CAP_SYS_NICE)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (OSError, AttributeError):
        pass


class Coordinator:
    """Claims, leases, dedup and the writer of one cluster run (see the module doc)."""

    def __init__(self, store_path: str, identity: tuple[str, int, int], model_id: int, run_id: int,
                 lease_seconds: float, order: str, limit: int | None):
        if store_identity(store_path) != tuple(identity):
            # a driver reached through Ray Client, or a head that is not this machine
            raise ExtractionError(
                f"the coordinator on {socket.gethostname()} does not see the driver's store {store_path}: "
                "run `embstore extract --ray` on the machine that holds the store"
            )
        _normal_priority()
        self.writer = ZarrWriter(store_path, model_id, run_id)
        self.conn = self.writer.conn  # one connection for claims and commits alike
        self.model_id = model_id
        self.run_id = run_id
        self.lease_seconds = lease_seconds
        self.order = order
        self.room = limit  # --limit: items the run may still claim (None: no limit)
        self.written: list = []
        self.failed = False

    # -- what workers ask -----------------------------------------------------------

    def model(self) -> RayModel:
        record = model_row(self.conn, self.model_id)
        roots = tuple(tasks.roots_with_open_work(self.conn, self.model_id))
        return RayModel(self.model_id, untrimmed_fingerprint(record.fingerprint), roots)

    def claim(self, request: ClaimRequest) -> list[ClaimedTask]:
        if self.failed:
            return []  # the writer cannot go on: no more work goes out
        want = request.max_items if self.room is None else min(request.max_items, self.room)
        if want <= 0:
            return []
        if request.suspect:
            rows = tasks.claim_suspect(self.conn, self.model_id, request.owner, self.lease_seconds)
        else:
            rows = tasks.claim_batch(self.conn, self.model_id, request.owner, self.lease_seconds, want,
                                     request.max_frames, self.order)
        if self.room is not None:
            self.room -= len(rows)
        return [to_claimed(r) for r in rows]

    def lease(self, request: LeaseRequest) -> int:
        if request.action == "renew":
            return tasks.renew_lease(self.conn, request.owner, self.lease_seconds)
        if request.action == "release":
            return tasks.release_claims(self.conn, request.owner)
        if request.action == "refresh":
            # leases run out, dead drivers' actors; items scanned during a cluster run
            # wait for the next run (their lengths need the model, which stays on the workers)
            with immediate(self.conn):
                return tasks.release_lost(self.conn, self.model_id, time.time())
        raise ValueError(f"unknown lease action {request.action!r}")

    def dedup(self, request: DedupRequest) -> DedupRows:
        return DedupRows(tasks.rows_of_identical_audio(self.conn, self.model_id, request.keys))

    # -- results --------------------------------------------------------------------

    def results(self, batch: PackedResults) -> None:
        self.writer.write_batch(unpack(batch))
        if self.writer.due():
            self._flush()

    def finished(self, message: WorkerFinished) -> None:
        """A worker stopped: commit what it sent, then free what it still holds."""
        self._flush()
        if message.owner is not None:
            self.writer.release(message.owner)

    def died(self, death: WorkerDied) -> None:
        """A worker died while its node lives: commit what it sent, count the death
        against what it held (poison items), free the rest."""
        self._guarded(lambda: self.writer.died(death))

    def poll(self) -> CoordinatorProgress:
        """Commits since the last poll (flushing what is due): the driver's progress."""
        if self.writer.due():
            self._flush()
        out, self.written = tuple(self.written), []
        return CoordinatorProgress(out)

    def close(self, run_owners: str) -> CoordinatorProgress:
        """The run is over: last commit, then every claim of its actors goes back."""
        self._flush()
        try:
            tasks.release_owners_like(self.conn, run_owners)
        finally:
            self.writer.close()
        out, self.written = tuple(self.written), []
        return CoordinatorProgress(out, self.writer.totals)

    # -- inside ---------------------------------------------------------------------

    def _flush(self) -> None:
        self._guarded(self.writer.flush)

    def _guarded(self, commit: Callable[[], Written]) -> None:
        if self.failed:
            return
        try:
            written = commit()
        except Exception as exc:
            self.failed = True
            self.written.append(writer_failure(exc, self.writer.store_path))
            return
        if written.done or written.failed:
            self.written.append(written)
