"""Cluster scale: can the coordinator (claims, dedup, commits) feed a large cluster?

    python benchmarks/ray_scale.py --items 200000 --claim 300 --out bench-out/ray_scale.json

A store of N items is made straight in SQL (the scanner has its own benchmark), then
the same claim -> dedup -> commit loop runs twice, side by side:

- local: one process, `SqliteManifestClient` + `ZarrWriter` (no Ray): the baseline;
- cluster: a 3-node local Ray cluster (head + 2 nodes, loopback only), the real
  coordinator actor pinned to the head, and feeder actors on the two other nodes
  (`--feeders-per-node`, as a node has several GPU workers) that drive the real
  `RemoteManifestClient` and `RemoteOutbox`: claims of `--claim` items, one dedup
  call per claim, result batches of the null encoder's vector (`null:DIM`).

Both commit through the unchanged protocol (a result is written only while its sender
still holds the claim). The figure is committed items per second from the first claim
to the last commit; `ratio` is cluster / local. With `--e2e N` it also runs
`extract --ray` with `null:DIM` on N real tiny files over the same cluster: the real
worker loop, whose file reading and decoding bound it on a small machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOOPBACK = "127.0.0.1"


def build_store(path: Path, items: int, dim: int) -> int:
    """A store of `items` one-second items (no audio behind them) and their null-model
    tasks; returns the model id."""
    import embstore
    from embstore.manifest import tasks
    from embstore.manifest.connection import utcnow
    from embstore.models.null import NullEncoder

    shutil.rmtree(path, ignore_errors=True)
    st = embstore.open(path)
    now = utcnow()
    with st.manifest.write() as conn:
        root = conn.execute(
            "INSERT INTO roots (kind, path, layout, created_at) VALUES ('tree', '/bench', 'speaker', ?)", (now,)
        ).lastrowid
        conn.executemany(
            "INSERT INTO files (id, root_id, dir, path, dataset, speaker, size, mtime_ns, sample_rate, channels,"
            " frames, duration, subtype, status, scanned_at)"
            " VALUES (?, ?, ?, ?, 'ds', ?, 32044, 0, 16000, 1, 16000, 1.0, 'PCM_16', 'ok', ?)",
            ((i + 1, root, f"spk{i // 100}", f"spk{i // 100}/{i}.wav", f"spk{i // 100}", now) for i in range(items)),
        )
        conn.executemany(
            "INSERT INTO items (id, uid, file_id, dataset, speaker, duration) VALUES (?, ?, ?, 'ds', ?, 1.0)",
            ((i + 1, f"ds/spk{i // 100}/{i}", i + 1, f"spk{i // 100}") for i in range(items)),
        )
    encoder = NullEncoder(dim)
    model = st.manifest.register_model(encoder.describe())
    tasks.refresh_tasks(st.manifest.conn, model.id, encoder.feature_length, encoder.sample_rate)
    st.close()
    return int(model.id)


def outcomes_of(claimed: list, owner: str, vector: Any) -> list:
    from embstore.extract.messages import ItemResult

    # a distinct content hash per file, as real audio has: the commit records it for dedup
    return [ItemResult(t.task_id, t.item_id, owner, f"h{t.item_id}", t.duration, vector) for t in claimed]


def feed(client: Any, outbox: Any, claim: int, vector: Any, index: int) -> int:
    """The worker's side of a run without the audio: claim, one dedup lookup per claim,
    results of the null vector; returns the items sent."""
    sent = 0
    while True:
        claimed = client.claim(claim, 10**12)
        if not claimed:
            break
        client.dedup_rows([(f"h{t.item_id}", t.start, t.end) for t in claimed])
        outbox.results(outcomes_of(claimed, client.owner, vector))
        sent += len(claimed)
    outbox.finished(index, client.owner)
    return sent


def run_local(store: Path, model_id: int, claim: int, dim: int) -> dict[str, Any]:
    """The baseline: one process claims and commits through SQLite and Zarr directly."""
    from embstore.extract.client import SqliteManifestClient
    from embstore.extract.outbox import Outbox
    from embstore.extract.writer import ZarrWriter
    from embstore.manifest.tasks import new_owner
    from embstore.models.null import NullEncoder

    encoder = NullEncoder(dim)
    writer = ZarrWriter(store, model_id, None)

    class WriterOutbox(Outbox):  # the local writer process's loop, in process
        def results(self, outcomes: list) -> None:
            writer.write_batch(outcomes)
            if writer.due():
                writer.flush()

        def finished(self, index: int, owner: str) -> None:
            writer.flush()
            writer.release(owner)

        def report(self, message: Any) -> None:
            pass

    client = SqliteManifestClient(store, model_id, new_owner(), 600, "item", encoder.feature_length, 16000)
    started = time.monotonic()
    sent = feed(client, WriterOutbox(), claim, encoder.vector, 0)
    seconds = time.monotonic() - started
    done = writer.totals.done
    writer.close()
    client.close()
    return {"items": sent, "done": done, "seconds": round(seconds, 2), "items_per_second": round(done / seconds)}


class Feeder:
    """A cluster node's stand-in for a worker actor: the real remote client and outbox."""

    def __init__(self, coordinator: Any, run_id: int, index: int):
        import ray

        from embstore.extract.ray.actors import RemoteManifestClient, RemoteOutbox
        from embstore.manifest.tasks import ray_owner

        context = ray.get_runtime_context()
        owner = ray_owner(context.get_node_id()[:8], context.get_actor_id()[:8], run_id)
        self.client = RemoteManifestClient(coordinator, owner)
        self.outbox = RemoteOutbox(coordinator, owner)
        self.index = index

    def run(self, claim: int, dim: int) -> tuple[int, float, float]:
        from embstore.models.null import NullEncoder

        started = time.time()
        sent = feed(self.client, self.outbox, claim, NullEncoder(dim).vector, self.index)
        return sent, started, time.time()


def start_cluster(base: Path) -> Any:
    """Head + 2 nodes of 1 CPU each, every one on 127.0.0.1."""
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                      RAY_TMPDIR=str(base / "t"), PYTHONPATH=str(ROOT))
    (base / "t" / "ray").mkdir(parents=True, exist_ok=True)
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args=dict(node_ip_address=LOOPBACK, num_cpus=1, include_dashboard=False))
    for _ in range(2):
        cluster.add_node(node_ip_address=LOOPBACK, num_cpus=1)
    ray.init(address=cluster.address, namespace="embstore", log_to_driver=False)
    return cluster


def run_cluster(store: Path, model_id: int, claim: int, dim: int, on_head: bool = False,
                per_node: int = 4) -> dict[str, Any]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    import embstore
    from embstore.extract.ray.actors import remote_classes
    from embstore.extract.ray.coordinator import store_identity
    from embstore.extract.messages import CoordinatorProgress
    from embstore.manifest import runs

    st = embstore.open(store)
    run_id = runs.start_run(st.manifest.conn, model_id, {"benchmark": "ray_scale"})
    Coordinator, _ = remote_classes()
    head = ray.get_runtime_context().get_node_id()
    coordinator = Coordinator.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote(
        str(store), store_identity(str(store)), model_id, run_id, 600, "item", None
    )
    ray.get(coordinator.model.remote())
    # the feeders on the worker nodes: the head's core is the coordinator's (and its raylet's)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and (on_head or n["NodeID"] != head)]
    feeder = ray.remote(num_cpus=0)(Feeder)
    # several per node, as a node has several GPU workers (each with a claim in flight)
    placed = [n for n in nodes for _ in range(per_node)]
    feeders = [feeder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
        coordinator, run_id, i) for i, n in enumerate(placed)]
    started = time.monotonic()
    results = ray.get([f.run.remote(claim, dim) for f in feeders])
    closed: CoordinatorProgress = ray.get(coordinator.close.remote(f"ray:%:{run_id}"))
    seconds = time.monotonic() - started
    runs.end_run(st.manifest.conn, run_id, "finished", {"done": closed.finished.done})
    verify = st.verify()
    st.close()
    done = closed.finished.done
    return {"items": sum(r[0] for r in results), "done": done, "dropped": closed.finished.dropped,
            "flushes": closed.finished.flushes, "nodes": 3, "feeders": len(placed), "seconds": round(seconds, 2),
            "items_per_second": round(done / seconds), "verify_ok": verify.ok}


def run_e2e(base: Path, files: int, dim: int) -> dict[str, Any]:
    """`extract --ray` with the null model on real tiny files: the real worker loop."""
    import soundfile as sf
    import numpy as np

    import embstore

    root = base / "audio"
    noise = np.random.default_rng(0).standard_normal(1600).astype(np.float32) * 0.1
    for i in range(files):
        path = root / "ds" / f"spk{i // 100}" / f"{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), np.roll(noise, i), 16000)
    st = embstore.open(base / "e2e-store")
    st.scan([root])
    summary = st.extract(model=f"null:{dim}", ray="auto", workers=3)
    st.close()
    return {"files": files, "done": summary.done, "seconds": round(summary.seconds, 2),
            "items_per_second": round(summary.items_per_second), "workers_per_node": summary.workers_per_node}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--claim", type=int, default=300, help="items per claim (and per result batch)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--feeders-per-node", type=int, default=4)
    parser.add_argument("--feeders-on-head", action="store_true", help="a feeder on the head node too")
    parser.add_argument("--e2e", type=int, default=0, help="also extract --ray this many real tiny files")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="emb-scale-", dir="/tmp"))
    report: dict[str, Any] = {"items": args.items, "claim_items": args.claim, "dim": args.dim,
                              "cpus": os.cpu_count()}
    try:
        model_id = build_store(base / "local-store", args.items, args.dim)
        report["local"] = run_local(base / "local-store", model_id, args.claim, args.dim)
        print("local", report["local"], flush=True)
        model_id = build_store(base / "cluster-store", args.items, args.dim)
        cluster = start_cluster(base)
        try:
            report["cluster"] = run_cluster(base / "cluster-store", model_id, args.claim, args.dim,
                                            args.feeders_on_head, args.feeders_per_node)
            print("cluster", report["cluster"], flush=True)
            if args.e2e:
                report["e2e"] = run_e2e(base, args.e2e, args.dim)
                print("e2e", report["e2e"], flush=True)
        finally:
            import ray

            ray.shutdown()
            cluster.shutdown()
        report["ratio_cluster_to_local"] = round(
            report["cluster"]["items_per_second"] / report["local"]["items_per_second"], 2)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
