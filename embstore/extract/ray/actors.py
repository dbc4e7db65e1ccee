"""The worker actor: the local worker loop, on a node of the cluster.

`WorkerActor` runs `embstore.extract.worker.Worker` unchanged, with a
`RemoteManifestClient` and a `RemoteOutbox` that call the coordinator actor. Audio
never travels through Ray: each worker reads the files from its own node (scan roots
checked, `--path-map` applied, before its first claim). Only claims (ids, paths,
lengths), dedup keys, vectors and reports cross the actor boundary, as the typed
messages of `embstore.extract.messages`.

Ray is imported inside functions only: `embstore --help` never loads it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from typing import Any, Sequence

from embstore.extract.client import DedupKey, ManifestClient
from embstore.extract.ray.wire import pack
from embstore.extract.ray.nodes import local_spec, missing_roots_line, node_name, resolve_roots
from embstore.extract.messages import (
    ClaimedTask, ClaimRequest, RayModel, DedupRequest, ItemOutcome, LeaseRequest, ProgressReport,
    WorkerDone, WorkerFailed, WorkerFinished, WorkerJoined, WorkerSetup,
)
from embstore.extract.outbox import Outbox
from embstore.manifest.tasks import ray_owner

# result messages a worker may have in flight to the coordinator before it waits
RESULTS_IN_FLIGHT = 8
# Ray passes call arguments under 100 KiB inside the call itself; larger ones go through
# the object stores, which the one-at-a-time coordinator would wait on, call by call
INLINE_BYTES = 90_000


class RemoteManifestClient(ManifestClient):
    """Claims, leases and dedup through the coordinator actor; claimed paths rewritten
    to where this node has them."""

    def __init__(self, coordinator: Any, owner: str, rewrites: Sequence[tuple[str, str]] = ()):
        self.coordinator = coordinator
        self.owner = owner
        self.rewrites = list(rewrites)  # (root as scanned, root on this node), longest first

    def _call(self, method: str, message: Any) -> Any:
        import ray

        return ray.get(getattr(self.coordinator, method).remote(message))

    def _local(self, task: ClaimedTask) -> ClaimedTask:
        for old, new in self.rewrites:
            if task.path.startswith(old.rstrip("/") + "/"):
                return dataclasses.replace(task, path=new.rstrip("/") + task.path[len(old.rstrip("/")):])
        return task

    def claim(self, max_items: int, max_frames: int) -> list[ClaimedTask]:
        return [self._local(t) for t in self._call("claim", ClaimRequest(self.owner, max_items, max_frames))]

    def claim_suspect(self, max_frames: int) -> list[ClaimedTask]:
        return [self._local(t) for t in self._call("claim", ClaimRequest(self.owner, 1, max_frames, suspect=True))]

    def renew(self) -> None:
        self._call("lease", LeaseRequest(self.owner, "renew"))

    def release(self) -> int:
        return self._call("lease", LeaseRequest(self.owner, "release"))

    def refresh(self) -> None:
        self._call("lease", LeaseRequest(self.owner, "refresh"))

    def dedup_rows(self, keys: Sequence[DedupKey]) -> dict[DedupKey, int]:
        return self._call("dedup", DedupRequest(tuple(keys))).rows


class RemoteOutbox(Outbox):
    """Results to the coordinator (a few batches in flight, then it waits: memory stays
    bounded and a slow commit slows the workers instead of queueing without end);
    reports kept for the driver, which gets them when the actor's run returns."""

    def __init__(self, coordinator: Any, owner: str):
        self.coordinator = coordinator
        self.owner = owner
        self.pending: deque = deque()
        self.reports: list[ProgressReport] = []
        self.lock = threading.Lock()

    def results(self, outcomes: list[ItemOutcome]) -> None:
        import ray

        for part in pack(self.owner, outcomes, INLINE_BYTES):
            self.pending.append(self.coordinator.results.remote(part))
        while len(self.pending) > RESULTS_IN_FLIGHT:
            ray.get(self.pending.popleft())

    def finished(self, index: int, owner: str) -> None:
        import ray

        ray.get(list(self.pending))
        self.pending.clear()
        ray.get(self.coordinator.finished.remote(WorkerFinished(index, owner)))

    def report(self, message: ProgressReport) -> None:
        with self.lock:
            self.reports.append(message)


class WorkerActor:
    """One worker of a cluster run (one per GPU, or a CPU worker). `start` loads the
    model and checks the node; `run` is the worker loop; `stop` asks it to stop after
    its current batch (the actor runs two calls at once for that)."""

    def __init__(self, setup: WorkerSetup, coordinator: Any, run_id: int, path_pairs: Sequence[tuple[str, str]],
                 features: str):
        import ray

        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.node = node_name(self.node_id, self.node_ip)
        self.owner = ray_owner(self.node_id[:8], context.get_actor_id()[:8], run_id)
        self.setup = setup
        self.coordinator = coordinator
        self.path_pairs = list(path_pairs)
        self.features = features
        self.stop_event = threading.Event()
        self.encoder: Any = None
        self.client: RemoteManifestClient | None = None

    def start(self) -> WorkerJoined | WorkerFailed:
        """Load the model on this node and check it may work here; a refusal is one line
        naming the node."""
        import ray

        try:
            model: RayModel = ray.get(self.coordinator.model.remote())
            rewrites, missing = resolve_roots(model.roots, self.path_pairs)
            if missing:
                return WorkerFailed(self.owner, missing_roots_line(self.node, missing))
            self.setup = self._placed(self.setup)
            from embstore.extract.worker import open_encoder

            self.encoder = open_encoder(self.setup)
            # fbank batched on the model's device where the model can (GPU workers, auto)
            on_device = self.features == "device" or (self.features == "auto" and self.setup.device != "cpu")
            self.setup = dataclasses.replace(
                self.setup, device_features=on_device and self.encoder.capabilities.device_features
            )
            if self.encoder.fingerprint != model.fingerprint:
                return WorkerFailed(
                    self.owner,
                    f"{self.node}: its model {self.setup.model_spec} has fingerprint {self.encoder.fingerprint[:12]}, "
                    f"the store's rows were made by {model.fingerprint[:12]} (different weights or settings there)",
                )
            self.client = RemoteManifestClient(self.coordinator, self.owner, rewrites)
        except Exception as exc:
            from embstore.extract.worker import one_line

            return WorkerFailed(self.owner, f"{self.node}: {one_line(exc)}")
        return WorkerJoined(self.owner, self.node_id, self.node_ip, self.setup.device)

    def _placed(self, setup: WorkerSetup) -> WorkerSetup:
        """The setup on this node: its GPU if Ray gave it one that torch sees, else the
        CPU; the model's path as this node has it."""
        from embstore.extract.plan import default_batch_frames

        device = "cpu"
        if setup.device.startswith("cuda"):
            import torch

            if torch.cuda.is_available():
                device = "cuda:0"  # Ray set CUDA_VISIBLE_DEVICES to this actor's GPU
        # the batch budget comes from this node's GPU memory, unless the user set it
        frames = setup.batch_frames or default_batch_frames(device, setup.batching)
        return dataclasses.replace(setup, device=device, batch_frames=frames,
                                   model_spec=local_spec(setup.model_spec, self.path_pairs))

    def run(self) -> WorkerDone:
        from embstore.extract.worker import Worker, one_line

        outbox = RemoteOutbox(self.coordinator, self.owner)
        if self.client is None:
            return WorkerDone(self.owner, (WorkerFailed(self.owner, f"{self.node}: run before a successful start"),))
        try:
            Worker(self.setup, self.encoder, self.client, outbox, self.stop_event).run()
        except Exception as exc:
            outbox.report(WorkerFailed(self.owner, f"{self.node}: {one_line(exc)}"))
        return WorkerDone(self.owner, tuple(outbox.reports))

    def stop(self) -> None:
        self.stop_event.set()


def remote_classes() -> tuple[Any, Any]:
    """(coordinator actor class, worker actor class), made remote on first use."""
    import ray

    from embstore.extract.ray.coordinator import Coordinator

    # max_restarts=0: a restarted worker would be a new process holding no claims under
    # an old name; the driver starts a fresh actor (a new owner) instead
    coordinator = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(Coordinator)
    worker = ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=2)(WorkerActor)
    return coordinator, worker
