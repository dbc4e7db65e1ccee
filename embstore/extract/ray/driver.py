"""`embstore extract --ray`: one run over a Ray cluster, driven from the store's machine.

The driver plans as a local run does (model row, task list), then starts the
coordinator actor on its own node (node affinity, not soft: the store never leaves this
disk) and one worker actor per GPU of the cluster, or `--workers N` CPU actors (default:
one per node, each taking the node's CPUs). It watches every actor's calls:

- an actor that dies while its node lives (a segfault, the OOM killer, `ray.kill`):
  the coordinator commits what it sent, counts the death against what it still held
  (poison items) and frees the rest at once;
- an actor lost with its node: what it held is freed at once (late results are dropped
  at commit), and no item is blamed;
- either way a replacement starts where the cluster has the resources for one.

A driver that crashes takes its actors with it (Ray kills what a dead owner created);
the next run frees their claims at once (`tasks.ray_run_is_gone`). One progress bar
counts the whole cluster; the run's summary, and so `status`, keeps its workers per node.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from embstore.errors import ExtractionError
from embstore.extract.ray.actors import remote_classes
from embstore.extract.ray.coordinator import store_identity
from embstore.extract.ray.nodes import node_name
from embstore.extract.messages import (
    WorkerDied, WorkerDone, WorkerFailed, WorkerFinished, WorkerJoined, WorkerSetup,
)
from embstore.extract.options import ExtractOptions
from embstore.extract.summary import ExtractSummary
from embstore.extract.supervisor import RunProcesses, run_extraction
from embstore.manifest import tasks
from embstore.manifest.database import Manifest

POLL_SECONDS = 0.25
CLAIM_ITEMS = {"cpu": 256, "gpu": 512}  # a claim's items, before the end-of-run balancing below


def run_ray_extraction(manifest: Manifest, options: ExtractOptions) -> ExtractSummary:
    """`Store.extract(ray=...)`: connect to the cluster, then run as `run_extraction` does."""
    connected = connect(options.ray or "auto")
    try:
        return run_extraction(manifest, options, runner=RayRun)
    finally:
        if connected:
            import ray

            ray.shutdown()


def connect(address: str) -> bool:
    """Join the cluster at `address` ("auto": RAY_ADDRESS, else a cluster running on this
    machine); never starts one. True when this call connected (and should disconnect)."""
    try:
        import ray
    except ImportError:
        raise ExtractionError('--ray needs Ray on this machine and every node: pip install "embstore[ray]"') from None
    if ray.is_initialized():
        return False
    if address.startswith("ray://"):
        raise ExtractionError(
            "--ray ray://... (Ray Client) would put the store on another machine than the coordinator: "
            "run `embstore extract --ray auto` on a node of the cluster that holds the store (the head)"
        )
    try:
        ray.init(address=address, namespace="embstore", log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtractionError(
            f"cannot join a Ray cluster at {address}: {first} (start one with `ray start --head`; see docs/ray.md)"
        ) from None
    return True


@dataclass
class Slot:
    """One worker actor of the run and where its calls stand."""

    index: int
    actor: Any
    options: dict[str, Any]  # its actor options, for a replacement
    phase: str = "start"  # start | run | done
    ref: Any = None
    joined: WorkerJoined | None = None
    lost: bool = False


@dataclass
class NodeTally:
    workers: int = 0
    devices: dict[str, int] = field(default_factory=dict)
    lost: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "devices": dict(sorted(self.devices.items())), "lost": self.lost}


class RayRun(RunProcesses):
    """One cluster run: the coordinator, the worker actors, and the driver watching them.
    Reports fold into the summary as in a local run (`RunProcesses.handle`)."""

    def __init__(self, manifest: Manifest, plan: Any, options: ExtractOptions, summary: ExtractSummary):
        super().__init__(manifest, plan, options, summary)
        self.stop_event = threading.Event()
        self.slots: list[Slot] = []
        self.nodes: dict[str, NodeTally] = {}
        self.replacements_left = 0
        self.wanted = 0  # replacements to start once the cluster has room
        self.lost_with_node = self.lost_alone = 0
        self.stopping = False
        # actor names: unique per run, also across stores sharing the cluster
        self.token = f"{tasks.HOST}-{summary.run_id}-{uuid.uuid4().hex[:8]}"

    # -- placement ------------------------------------------------------------------

    def _placements(self, ray: Any) -> tuple[str, list[dict[str, Any]]]:
        """("gpu" | "cpu", actor options per worker)."""
        if self.options.workers:
            cpus = self.options.threads or 1
            return "cpu", [{"num_cpus": cpus, "scheduling_strategy": "SPREAD"}] * self.options.workers
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus:
            return "gpu", [{"num_gpus": 1, "num_cpus": 1, "scheduling_strategy": "SPREAD"}] * gpus
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # no GPUs: one CPU worker per node, taking the node's CPUs
        return "cpu", [
            {"num_cpus": int(n["Resources"]["CPU"]),
             "scheduling_strategy": NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)}
            for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1
        ]

    def _setup(self, kind: str, n: int) -> WorkerSetup:
        base: WorkerSetup = self.setups[0]
        # claims small enough near the end for every worker to get a share
        share = max(1, math.ceil(self.plan.left / (4 * max(n, 1))))
        return dataclasses.replace(
            base, device="cuda" if kind == "gpu" else "cpu", batch_frames=self.options.batch_frames or 0,
            claim_items=min(CLAIM_ITEMS[kind], share),
            loader_workers=self.options.loader_workers or (6 if kind == "gpu" else 2),
            device_features=False,
        )

    def _start_actor(self, ray: Any, options: dict[str, Any]) -> None:
        index = len(self.slots)
        threads = self.options.threads or options.get("num_cpus", 1)
        setup = dataclasses.replace(self.template, index=index, threads=threads)
        actor = self.Worker.options(**options, name=f"embstore-{self.token}-worker-{index}").remote(
            setup, self.coordinator, self.summary.run_id, self.options.path_pairs(), self.options.features
        )
        slot = Slot(index, actor, options)
        slot.ref = actor.start.remote()
        self.slots.append(slot)

    # -- the run --------------------------------------------------------------------

    def run(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        Coordinator, self.Worker = remote_classes()
        here = ray.get_runtime_context().get_node_id()
        store_path = str(self.manifest.path)
        self.coordinator = Coordinator.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
            name=f"embstore-{self.token}-coordinator",
        ).remote(store_path, store_identity(store_path), self.plan.model_id, self.summary.run_id,
                 self.options.lease_seconds, self.setups[0].claim_order, self.options.limit)
        kind, placements = self._placements(ray)
        if not placements:
            self.summary.error = "the Ray cluster has no node with a CPU or GPU to work on"
            return
        self.template = self._setup(kind, len(placements))
        self.replacements_left = 2 * len(placements) + 2
        for options in placements:
            self._start_actor(ray, options)
        self.open_bar()
        on_main = threading.current_thread() is threading.main_thread()
        original_sigint = signal.getsignal(signal.SIGINT)
        if on_main:
            signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self._watch(ray)
        finally:
            if on_main:
                signal.signal(signal.SIGINT, original_sigint)
            self._close(ray)
            if self.bar is not None:
                self.bar.close()
        self._conclude_cluster()

    def _watch(self, ray: Any) -> None:
        while True:
            live = {s.ref: s for s in self.slots if s.phase != "done"}
            if not live and not (self.wanted and self._room(ray)):
                return
            if live:
                ready, _ = ray.wait(list(live), num_returns=1, timeout=POLL_SECONDS)
                if ready:
                    ready, _ = ray.wait(list(live), num_returns=len(live), timeout=0)
                for ref in ready:
                    self._settle(ray, live[ref], ref)
            self._poll(ray)
            if self.stop_event.is_set() and not self.stopping:
                self.stopping = True
                self.wanted = 0
                for s in self.slots:
                    if s.phase != "done":
                        s.actor.stop.remote()
            self._replace(ray)

    def _settle(self, ray: Any, slot: Slot, ref: Any) -> None:
        from ray.exceptions import RayActorError, RayTaskError

        try:
            value = ray.get(ref)
        except RayActorError as exc:
            self._lost(ray, slot, exc)
            return
        except RayTaskError as exc:  # a bug, not a death: the actor lives and says why
            self.worker_errors.append(f"{self._where(slot)}: {str(exc).strip().splitlines()[-1]}")
            self._finish(slot)
            return
        if isinstance(value, WorkerJoined):
            slot.joined = value
            tally = self.nodes.setdefault(node_name(value.node_id, value.node_ip), NodeTally())
            tally.workers += 1
            tally.devices[value.device] = tally.devices.get(value.device, 0) + 1
            slot.phase, slot.ref = "run", slot.actor.run.remote()
        elif isinstance(value, WorkerFailed):  # refused (fingerprint, roots): no replacement
            self.worker_errors.append(value.error)
            self._finish(slot)
        elif isinstance(value, WorkerDone):
            for report in value.reports:
                self.handle(report)
            self._finish(slot)

    def _finish(self, slot: Slot) -> None:
        import ray

        if slot.joined is not None and slot.phase == "run":
            # whatever it still holds goes back (its own outbox did so unless it failed)
            ray.get(self.coordinator.finished.remote(WorkerFinished(slot.index, slot.joined.owner)))
        slot.phase = "done"
        ray.kill(slot.actor)

    def _where(self, slot: Slot) -> str:
        return node_name(slot.joined.node_id, slot.joined.node_ip) if slot.joined else f"worker {slot.index}"

    def _lost(self, ray: Any, slot: Slot, exc: BaseException) -> None:
        """An actor is gone: free what it held at once; blame its items only when its
        process died on a node that lives on. A lost node (or network) shows first as
        ActorUnavailableError, seconds before Ray declares the node dead: not the items'
        fault either way."""
        from ray.exceptions import ActorDiedError

        slot.phase, slot.lost = "done", True
        # given up on: should an unreachable one come back, it must not claim more
        # (its late results would be dropped at commit anyway: we freed its claims)
        ray.kill(slot.actor)
        joined = slot.joined
        node_alive = isinstance(exc, ActorDiedError) and joined is not None and any(
            n["NodeID"] == joined.node_id and n["Alive"] for n in ray.nodes()
        )
        if joined is not None:
            where = node_name(joined.node_id, joined.node_ip)
            self.nodes[where].lost += 1
            if node_alive:
                self.lost_alone += 1
                reason = f"worker on {where} died ({_first_line(exc)})"
                ray.get(self.coordinator.died.remote(WorkerDied(slot.index, joined.owner, joined.owner, reason)))
            else:
                self.lost_with_node += 1
                ray.get(self.coordinator.finished.remote(WorkerFinished(slot.index, joined.owner)))
        if not self.stopping and self.replacements_left > 0:
            self.wanted += 1

    def _room(self, ray: Any) -> bool:
        """Whether the live nodes have a GPU (or CPU) that no worker of this run holds:
        counted from the nodes Ray says are alive, not from its resource view, which
        keeps a lost node's GPUs for a while."""
        alive = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        live = [s.options for s in self.slots if s.phase != "done"]
        need = self._replacement_options()
        for key, option in (("GPU", "num_gpus"), ("CPU", "num_cpus")):
            free = sum(r.get(key, 0) for r in alive) - sum(o.get(option, 0) for o in live)
            if need.get(option, 0) > free:
                return False
        return True

    def _replacement_options(self) -> dict[str, Any]:
        options = dict(self.slots[0].options)
        if "num_gpus" not in options:  # a CPU worker goes wherever there is a CPU
            options.update(num_cpus=1, scheduling_strategy="SPREAD")
        return options

    def _replace(self, ray: Any) -> None:
        if not self.wanted or self.stopping:
            return
        left, _ = tasks.pending_summary(self.manifest.conn, self.plan.model_id)
        if not left:
            self.wanted = 0
            return
        while self.wanted and self.replacements_left and self._room(ray):
            self.wanted -= 1
            self.replacements_left -= 1
            self._start_actor(ray, self._replacement_options())

    def _poll(self, ray: Any) -> None:
        progress = ray.get(self.coordinator.poll.remote())
        for message in progress.written:
            self.handle(message)

    def _close(self, ray: Any) -> None:
        for s in self.slots:
            if s.phase != "done":
                ray.kill(s.actor)
        try:
            progress = ray.get(self.coordinator.close.remote(f"ray:%:{self.summary.run_id}"))
        except Exception as exc:  # the coordinator is gone: leases and the next run free its claims
            if not self.summary.error:
                self.summary.error = f"the coordinator failed: {_first_line(exc)}"
            return
        finally:
            ray.kill(self.coordinator)
        for message in progress.written:
            self.handle(message)
        if progress.finished is not None:
            self.handle(progress.finished)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        import ray

        self.interrupts += 1
        self.summary.interrupted = True
        self.stop_event.set()
        if self.interrupts > 1:
            for s in self.slots:
                if s.phase != "done":
                    ray.kill(s.actor)

    def _conclude_cluster(self) -> None:
        summary = self.summary
        self.conclude_workers()
        joined = [s.joined for s in self.slots if s.joined is not None]
        summary.workers = len(joined)
        summary.devices = [j.device for j in joined]
        summary.workers_per_node = {name: tally.as_dict() for name, tally in sorted(self.nodes.items())}
        lost = self.lost_with_node + self.lost_alone
        if lost and not summary.error and not summary.interrupted:
            left, _ = tasks.pending_summary(self.manifest.conn, self.plan.model_id)
            if left:
                summary.error = (f"{lost} worker(s) lost ({self.lost_with_node} with their node) with {left} items "
                                 "left and no room for replacements; run again")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["run_ray_extraction", "connect", "RayRun"]
