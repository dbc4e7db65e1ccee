"""Every message that crosses a process or actor boundary during extraction.

    supervisor --WorkerSetup--> worker            (how to run: model, device, batching)
    manifest   --ClaimedTask--> worker            (via a ManifestClient)
    worker     --ResultBatch--> writer            (via an Outbox)
    worker / supervisor --WorkerFinished--> writer
    worker     --WorkerStats | WorkerFailed--> supervisor
    writer     --Written | WriterFailed | WriterFinished--> supervisor

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


WriterInbox = Union[ResultBatch, WorkerFinished]
ProgressReport = Union[WorkerStats, WorkerFailed, Written, WriterFailed, WriterFinished]
