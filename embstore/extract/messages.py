"""Every message that crosses a process or actor boundary during extraction.

    supervisor --WorkerSetup--> worker            (how to run: model, device, batching)
    manifest   --ClaimedTask--> worker            (via a ManifestClient)
    worker     --ResultBatch--> writer            (via an Outbox)
    worker / supervisor --WorkerFinished--> writer
    supervisor --WorkerDied--> writer             (a worker killed while holding claims)
    worker     --WorkerStats | WorkerFailed--> supervisor
    writer     --Written | WriterFailed | WriterFinished--> supervisor

On a cluster (embstore.extract.ray) the manifest and the writer sit behind the
coordinator actor, and these travel as actor calls as well:

    worker      --ClaimRequest | LeaseRequest | DedupRequest | PackedResults--> coordinator
    coordinator --RayModel | DedupRows--> worker
    worker      --WorkerJoined | WorkerDone--> driver      (returns of the actor's calls)
    driver      --WorkerDied--> coordinator
    coordinator --CoordinatorProgress--> driver

All are plain dataclasses of builtins and NumPy arrays, so they pickle across
multiprocessing queues and Ray actor calls alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np


@dataclass(frozen=True)
class WorkerSetup:
    """How one worker runs, resolved by the plan (not the user's options)."""

    model_spec: str  # what the worker loads (an ONNX export of the user's model, say)
    model_id: int
    device: str
    dtype: str
    batching: str  # any | masked | equal: how this run batches
    batch_frames: int | None  # None: sized by the worker from its device's free memory
    claim_items: int
    loader_workers: int
    threads: int
    lease_seconds: float
    max_trim_frames: int = 0
    index: int = 0  # which worker of the run: the writer counts finished workers by it
    device_features: bool = False  # fbank on the model's device, batched (GPU); loaders only decode
    fingerprint: str | None = None  # what the loaded model must fingerprint as (None: not checked)
    workers_per_device: int = 1  # workers sharing this device (its memory)
    vad: str = "none"  # silero | webrtc | none: speech only (whole items) or where windows fall
    windows: str | None = None  # "WINDOW:SHIFT": a window model (one row per window)
    window_mode: str = "auto"  # how windows are embedded (WindowEmbedder's mode)

    @property
    def claim_order(self) -> str:
        # only equal-length batching needs the global length order; scan order keeps a
        # speaker's rows together in the store (mixed-length claims are sorted inside)
        return "length" if self.batching == "equal" else "item"


@dataclass(frozen=True)
class ClaimedTask:
    task_id: int
    item_id: int
    uid: str
    path: str
    start: float | None
    end: float | None
    duration: float
    length: int  # predicted feature frames


@dataclass
class ItemResult:
    task_id: int
    item_id: int
    owner: str
    content_hash: str | None
    seconds: float
    vector: np.ndarray | None = None  # [dim], or [windows, dim] for a window model; None: a duplicate
    row: int | None = None  # a duplicate's rows: `row_count` rows from `row` (None: one)
    row_count: int | None = None
    spans: np.ndarray | None = None  # a window model's [windows, 2] start/end seconds
    speech: tuple[str, list[tuple[float, float]]] | None = None  # (VAD key, regions) found on the way

    @property
    def rows(self) -> int:
        """Rows this result adds to the arrays (0 for a duplicate)."""
        if self.vector is None:
            return 0
        return 1 if self.vector.ndim == 1 else len(self.vector)


@dataclass
class ItemFailure:
    task_id: int
    owner: str
    stage: str  # read | decode | features | model | crash
    error: str


ItemOutcome = Union[ItemResult, ItemFailure]


@dataclass
class ResultBatch:
    """One claim's outcomes, from a worker to the writer."""

    outcomes: list[ItemOutcome] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerFinished:
    """A worker is done: the writer commits what it sent, then frees what it still holds.
    `owner` None: the supervisor found it dead (its claims are freed by the supervisor)."""

    index: int
    owner: str | None = None


@dataclass(frozen=True)
class WorkerDied:
    """A worker died holding claims while its run lives on: the writer commits what it
    sent, then counts the death against what it still held (poison items; see
    `embstore.manifest.tasks.record_death`) and gives that back. `owner` is exact, or
    with `prefix` the start of it (a local process: host:pid:); `worker` names the
    worker for the "different workers" rule."""

    index: int
    owner: str
    worker: str
    reason: str
    prefix: bool = False


@dataclass(frozen=True)
class WorkerStats:
    owner: str
    batches: int
    items: int
    real_frames: int
    padded_frames: int


@dataclass(frozen=True)
class WorkerFailed:
    owner: str
    error: str


@dataclass(frozen=True)
class Written:
    """One writer commit."""

    done: int
    failed: int
    seconds: float


@dataclass(frozen=True)
class WriterFailed:
    error: str


@dataclass(frozen=True)
class WriterFinished:
    done: int
    failed: int
    dropped: int  # results whose claim had been taken back (lease expired)
    seconds: float
    flushes: int


# -- on a cluster ------------------------------------------------------------------------


@dataclass(frozen=True)
class RayModel:
    """The run's model as the manifest knows it: a worker checks its own fingerprint
    against it, and every scan root against its node, before its first claim."""

    model_id: int
    fingerprint: str  # the encoder's own (untrimmed) fingerprint
    roots: tuple[str, ...]


@dataclass(frozen=True)
class ClaimRequest:
    owner: str
    max_items: int
    max_frames: int
    suspect: bool = False  # one suspect task, alone


@dataclass(frozen=True)
class LeaseRequest:
    owner: str
    action: str  # renew | release | refresh


@dataclass(frozen=True)
class DedupRequest:
    keys: tuple[tuple[str, float | None, float | None], ...]


@dataclass(frozen=True)
class DedupRows:
    rows: dict


@dataclass(frozen=True)
class PackedResults:
    """A claim's results as a few arrays: how a cluster worker's ResultBatch travels
    (one pickle of arrays, not of hundreds of objects each holding its own vector).
    Failures and results that reuse a done row travel as they are, in `others`."""

    owner: str
    task_ids: np.ndarray  # int64 [n]
    item_ids: np.ndarray  # int64 [n]
    seconds: np.ndarray  # float64 [n]
    hashes: tuple  # content hash (or None) per result
    vectors: np.ndarray  # float32 [n, dim]
    others: tuple = ()


@dataclass(frozen=True)
class WorkerJoined:
    """A worker actor is up: where it runs and on what."""

    owner: str
    node_id: str  # Ray's node id
    node_ip: str
    device: str  # what it computes on there


@dataclass(frozen=True)
class WorkerDone:
    """What a worker actor's run returns: its reports, in order (stats, failures)."""

    owner: str
    reports: tuple = ()


@dataclass(frozen=True)
class CoordinatorProgress:
    """Commits since the last poll; `finished` once the coordinator has closed."""

    written: tuple
    finished: WriterFinished | None = None


WriterInbox = Union[ResultBatch, WorkerFinished, WorkerDied]
ProgressReport = Union[WorkerStats, WorkerFailed, Written, WriterFailed, WriterFinished]
