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
the next run frees their claims at once (`tasks.ray_run_is_gone`). The run monitor
(`extract/monitor.py`) drives `RayLauncher` as it drives local processes: one progress
bar counts the whole cluster, Ctrl-C stops it cleanly; the run's summary, and so
`status`, keeps its workers per node.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from embstore.errors import ExtractionError
from embstore.extract.ray.actors import remote_classes
from embstore.extract.ray.coordinator import store_identity
from embstore.extract.ray.nodes import node_name
from embstore.extract.messages import (
    WorkerDied, WorkerDone, WorkerFailed, WorkerFinished, WorkerJoined, WorkerSetup, WriterFailed,
)
from embstore.extract.monitor import Report, monitored_extraction
from embstore.extract.options import ExtractOptions
from embstore.extract.plan import ExtractionPlan, worker_setup
from embstore.extract.summary import ExtractSummary
from embstore.manifest import tasks
from embstore.manifest.database import Manifest

POLL_SECONDS = 0.25
CLAIM_ITEMS = {"cpu": 256, "gpu": 512}  # a claim's items, before the end-of-run balancing below


def run_ray_extraction(manifest: Manifest, options: ExtractOptions) -> ExtractSummary:
    """`Store.extract(ray=...)`: connect to the cluster, then run as a local run does
    (`monitor.monitored_extraction`), with the cluster's workers (`RayLauncher`)."""
    connected = connect(options.ray or "auto")
    try:
        return monitored_extraction(manifest, options, RayLauncher)
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


def cluster_setup(plan: ExtractionPlan, options: ExtractOptions, kind: str, workers: int, index: int,
                  threads: int) -> WorkerSetup:
    """A worker actor's setup, as the driver knows it: "gpu" or "cpu" (`kind`) among
    `workers` actors. Its node settles the rest before its first claim (which GPU, batch
    frames from that GPU's memory, the model's path there, features on the device:
    `WorkerActor.start`)."""
    # claims small enough near the end for every worker to get a share
    share = max(1, math.ceil(plan.left / (4 * max(workers, 1))))
    return worker_setup(
        plan, options, device="cuda" if kind == "gpu" else "cpu", batch_frames=options.batch_frames or None,
        claim_items=min(CLAIM_ITEMS[kind], share), loader_workers=options.loader_workers or (6 if kind == "gpu" else 2),
        threads=threads, index=index,
    )


class RayLauncher:
    """The launcher of a cluster round (a `monitor.Launcher`): the coordinator actor on
    this node, the worker actors across the cluster, replacements for lost ones."""

    def __init__(self, manifest: Manifest, plan: ExtractionPlan, options: ExtractOptions, run_id: int):
        self.manifest = manifest
        self.plan = plan
        self.options = options
        self.run_id = run_id
        self.ray: Any = None  # the module, imported by `start` (never at import: `embstore --help`)
        self.coordinator: Any = None
        self.worker_class: Any = None
        self.report: Report = lambda message: None
        self.kind = "cpu"
        self.placed = 0  # worker actors placed at the start: claims are sized by it
        self.slots: list[Slot] = []
        self.nodes: dict[str, NodeTally] = {}
        self.replacements_left = 0
        self.wanted = 0  # replacements to start once the cluster has room
        self.lost_with_node = self.lost_alone = 0
        # asked to stop (from the SIGINT handler: a flag only, `step` tells the actors)
        self.stop_asked = self.stopping = self.killed = False
        # actor names: unique per run, also across stores sharing the cluster
        self.token = f"{tasks.HOST}-{run_id}-{uuid.uuid4().hex[:8]}"

    # -- placement ------------------------------------------------------------------

    def _placements(self) -> tuple[str, list[dict[str, Any]]]:
        """("gpu" | "cpu", actor options per worker)."""
        ray = self.ray
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

    def _setup(self, index: int, actor_options: dict[str, Any]) -> WorkerSetup:
        threads = self.options.threads or actor_options.get("num_cpus", 1)
        return cluster_setup(self.plan, self.options, self.kind, self.placed, index, threads)

    def _start_actor(self, actor_options: dict[str, Any]) -> None:
        index = len(self.slots)
        actor = self.worker_class.options(**actor_options, name=f"embstore-{self.token}-worker-{index}").remote(
            self._setup(index, actor_options), self.coordinator, self.run_id, self.options.path_pairs(),
            self.options.features,
        )
        slot = Slot(index, actor, actor_options)
        slot.ref = actor.start.remote()
        self.slots.append(slot)

    # -- the round, as the monitor drives it ------------------------------------------

    def start(self, report: Report) -> str | None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray, self.report = ray, report
        self.kind, placements = self._placements()
        if not placements:
            return "the Ray cluster has no node with a CPU or GPU to work on"
        self.placed = len(placements)
        coordinator_class, self.worker_class = remote_classes()
        here = ray.get_runtime_context().get_node_id()
        store_path = str(self.manifest.path)
        self.coordinator = coordinator_class.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
            name=f"embstore-{self.token}-coordinator",
        ).remote(store_path, store_identity(store_path), self.plan.model_id, self.run_id,
                 self.options.lease_seconds, self._setup(0, placements[0]).claim_order, self.options.limit)
        self.replacements_left = 2 * len(placements) + 2
        for actor_options in placements:
            self._start_actor(actor_options)
        return None

    def step(self) -> bool:
        live = {s.ref: s for s in self.slots if s.phase != "done"}
        if not live and not (self.wanted and self.replacements_left and self._room()):
            return False
        if live:
            ready, _ = self.ray.wait(list(live), num_returns=1, timeout=POLL_SECONDS)
            if ready:
                ready, _ = self.ray.wait(list(live), num_returns=len(live), timeout=0)
            for ref in ready:
                self._settle(live[ref], ref)
        self._poll()
        if self.stop_asked and not self.stopping:
            self.stopping = True
            self.wanted = 0
            for s in self.slots:
                if s.phase != "done":
                    s.actor.stop.remote()
        self._replace()
        return True

    def stop(self, failing: bool) -> None:
        self.stop_asked = True

    def kill(self) -> None:
        self.killed = True
        for s in self.slots:
            if s.phase != "done":
                self.ray.kill(s.actor)

    def close(self) -> None:
        if self.ray is None:
            return
        for s in self.slots:
            if s.phase != "done":
                self.ray.kill(s.actor)
        if self.coordinator is None:
            return
        try:
            progress = self.ray.get(self.coordinator.close.remote(f"ray:%:{self.run_id}"))
        except Exception as exc:  # the coordinator is gone: leases and the next run free its claims
            self.report(WriterFailed(f"the coordinator failed: {_first_line(exc)}"))
            return
        finally:
            self.ray.kill(self.coordinator)
        for message in progress.written:
            self.report(message)
        if progress.finished is not None:
            self.report(progress.finished)

    def losses(self) -> str | None:
        lost = self.lost_with_node + self.lost_alone
        if not lost:
            return None
        return f"{lost} worker(s) lost ({self.lost_with_node} with their node; no room left to replace them)"

    def conclude(self, summary: ExtractSummary) -> None:
        """The workers that joined, and where: the summary's, and so `status`'s."""
        joined = [s.joined for s in self.slots if s.joined is not None]
        summary.workers = len(joined)
        summary.devices = [j.device for j in joined]
        summary.workers_per_node = {name: tally.as_dict() for name, tally in sorted(self.nodes.items())}

    # -- inside -----------------------------------------------------------------------

    def _settle(self, slot: Slot, ref: Any) -> None:
        from ray.exceptions import RayActorError, RayTaskError

        try:
            value = self.ray.get(ref)
        except RayActorError as exc:
            self._lost(slot, exc)
            return
        except RayTaskError as exc:  # a bug, not a death: the actor lives and says why
            self.report(WorkerFailed(self._owner(slot), f"{self._where(slot)}: {str(exc).strip().splitlines()[-1]}"))
            self._finish(slot)
            return
        if isinstance(value, WorkerJoined):
            slot.joined = value
            tally = self.nodes.setdefault(node_name(value.node_id, value.node_ip), NodeTally())
            tally.workers += 1
            tally.devices[value.device] = tally.devices.get(value.device, 0) + 1
            slot.phase, slot.ref = "run", slot.actor.run.remote()
        elif isinstance(value, WorkerFailed):  # refused (fingerprint, roots): no replacement
            self.report(value)
            self._finish(slot)
        elif isinstance(value, WorkerDone):
            for report in value.reports:
                self.report(report)
            self._finish(slot)

    def _finish(self, slot: Slot) -> None:
        if slot.joined is not None and slot.phase == "run":
            # whatever it still holds goes back (its own outbox did so unless it failed)
            self.ray.get(self.coordinator.finished.remote(WorkerFinished(slot.index, slot.joined.owner)))
        slot.phase = "done"
        self.ray.kill(slot.actor)

    def _owner(self, slot: Slot) -> str:
        return slot.joined.owner if slot.joined else f"worker {slot.index}"

    def _where(self, slot: Slot) -> str:
        return node_name(slot.joined.node_id, slot.joined.node_ip) if slot.joined else f"worker {slot.index}"

    def _lost(self, slot: Slot, exc: BaseException) -> None:
        """An actor is gone: free what it held at once; blame its items only when its
        process died on a node that lives on, and not by our hand (a second Ctrl-C). A
        lost node (or network) shows first as ActorUnavailableError, seconds before Ray
        declares the node dead: not the items' fault either way."""
        from ray.exceptions import ActorDiedError

        ray = self.ray
        slot.phase, slot.lost = "done", True
        # given up on: should an unreachable one come back, it must not claim more
        # (its late results would be dropped at commit anyway: we freed its claims)
        ray.kill(slot.actor)
        joined = slot.joined
        if joined is not None:
            blamed = not self.killed and isinstance(exc, ActorDiedError) and any(
                n["NodeID"] == joined.node_id and n["Alive"] for n in ray.nodes())
            if not self.killed:
                self._tally_loss(joined, alone=blamed)
            if blamed:
                reason = f"worker on {node_name(joined.node_id, joined.node_ip)} died ({_first_line(exc)})"
                ray.get(self.coordinator.died.remote(WorkerDied(slot.index, joined.owner, joined.owner, reason)))
            else:
                ray.get(self.coordinator.finished.remote(WorkerFinished(slot.index, joined.owner)))
        if not self.stopping and self.replacements_left > 0:
            self.wanted += 1

    def _tally_loss(self, joined: WorkerJoined, alone: bool) -> None:
        self.nodes[node_name(joined.node_id, joined.node_ip)].lost += 1
        if alone:
            self.lost_alone += 1
        else:
            self.lost_with_node += 1

    def _room(self) -> bool:
        """Whether the live nodes have a GPU (or CPU) that no worker of this run holds:
        counted from the nodes Ray says are alive, not from its resource view, which
        keeps a lost node's GPUs for a while."""
        alive = [n["Resources"] for n in self.ray.nodes() if n["Alive"]]
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

    def _replace(self) -> None:
        if not self.wanted or self.stopping:
            return
        left, _ = tasks.pending_summary(self.manifest.conn, self.plan.model_id)
        if not left:
            self.wanted = 0
            return
        while self.wanted and self.replacements_left and self._room():
            self.wanted -= 1
            self.replacements_left -= 1
            self._start_actor(self._replacement_options())

    def _poll(self) -> None:
        progress = self.ray.get(self.coordinator.poll.remote())
        for message in progress.written:
            self.report(message)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["run_ray_extraction", "connect", "RayLauncher", "cluster_setup"]
