"""`extract --ray` on a local Ray cluster: a head and two nodes of one CPU each, the
two nodes with a fake GPU each (Ray's `num_gpus`; the workers compute on the CPU).

Loopback only: every node is started on 127.0.0.1, with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
RAY_AUTH_MODE=disabled, RAY_USAGE_STATS_ENABLED=0 and RAY_TMPDIR in a temporary folder;
`test_node_lost_mid_run...` checks that no socket of the cluster's processes is bound
to or connected to any other address. One cluster serves the module (starting one
costs seconds); the node-loss test removes a node, so it runs last.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import embstore
from embstore.extract.faults import CRASH_PATHS, HOLD_COMPUTE
from embstore.vectors import cosine_rows
from tests.audio_factory import make_tree, write
from tests.wespeaker_dirs import make_wespeaker_dir

if importlib.util.find_spec("ray") is None:
    pytest.skip('Ray is not installed (pip install "embstore[ray]")', allow_module_level=True)
ray = None  # imported by the cluster fixture, once RAY_* is set: Ray reads some of it at import

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-cluster")]

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
POISON = "kills-its-worker"


class LocalCluster:
    def __init__(self, base: Path):
        from ray.cluster_utils import Cluster

        self.base = base
        # the nodes' WeSpeaker hubs: node 2 holds other weights under the same name
        self.hubs = [base / "hub-a", base / "hub-b"]
        for hub in self.hubs:
            hub.mkdir()
        # workers compute while this file exists; a test removes it to hold them mid-run
        # (claims taken, nothing computed) for as long as it needs, whatever the CPU's speed
        self.release = base / "compute-released"
        self.release.touch()
        node_env = {CRASH_PATHS: POISON, HOLD_COMPUTE: str(self.release)}
        head = dict(node_ip_address=LOOPBACK, num_cpus=1, include_dashboard=False,
                    env_vars=node_env | {"WESPEAKER_HOME": str(self.hubs[0])})
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        self.nodes = [
            self.cluster.add_node(node_ip_address=LOOPBACK, num_cpus=1, num_gpus=1,
                                  env_vars=node_env | {"WESPEAKER_HOME": str(hub)})
            for hub in self.hubs
        ]
        ray.init(address=self.cluster.address, namespace="embstore", log_to_driver=False)

    def close(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()

    @contextlib.contextmanager
    def computes_held(self):
        """Workers claim but do not compute until the block ends."""
        self.release.unlink()
        try:
            yield
        finally:
            self.release.touch()


@pytest.fixture(scope="module")
def cluster():
    # short: Ray's socket paths live under RAY_TMPDIR and must stay under 108 bytes
    base = Path(tempfile.mkdtemp(prefix="emb-ray-", dir="/tmp"))
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(base / "t"), "PYTHONPATH": str(ROOT)}
    (base / "t" / "ray").mkdir(parents=True)
    patch = pytest.MonkeyPatch()
    for key, value in env.items():
        patch.setenv(key, value)
    global ray
    import ray as ray_module

    ray = ray_module
    handle = LocalCluster(base)
    try:
        yield handle
    finally:
        handle.close()
        patch.undo()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_wespeaker_dir(tmp_path_factory.mktemp("models"), arch="resnet34", num_mel_bins=40, embed_dim=32)


def scanned(tmp_path: Path, **tree) -> tuple[embstore.store.Store, list[Path]]:
    files = make_tree(tmp_path / "root", **tree)
    st = embstore.open(tmp_path / "store")
    st.scan([tmp_path / "root"])
    return st, files


def peek(store_path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows read on a connection of our own (the run uses the store's, in its thread)."""
    conn = sqlite3.connect(str(store_path / "manifest.db"), timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def done_count(store_path: Path) -> int:
    return peek(store_path, "SELECT count(*) FROM tasks WHERE status = 'done'")[0][0]


def claim_owners(store_path: Path) -> list[str]:
    return [r[0] for r in peek(store_path, "SELECT DISTINCT owner FROM tasks WHERE status = 'claimed'")]


def in_background(fn) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def wait_for(condition, thread: threading.Thread | None = None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or (thread is not None and not thread.is_alive()):
            raise AssertionError("the moment waited for never came (the run ended first?)")
        time.sleep(0.05)


def check_exactly_once(st, files: list[Path], root: Path, spec: str) -> None:
    """Every item done once (distinct rows inside the committed count, ids match), every
    vector equal to `embed_file`, `verify` clean, and a rerun has nothing to do."""
    from embstore.models import load

    rows = st.manifest.query("SELECT t.item_id, t.row, t.status FROM tasks t JOIN items i ON i.id = t.item_id")
    assert len(rows) == len(files) and all(r["status"] == "done" for r in rows)
    model = st.models()[0]
    assert len({r["row"] for r in rows}) == len(rows) and max(r["row"] for r in rows) < model.rows
    _, ids = st.manifest.model_arrays(model).arrays()
    assert all(ids[r["row"]] == r["item_id"] for r in rows)
    uids, vectors = st.embeddings()
    encoder = load(spec)
    by_uid = {os.path.splitext(str(f.relative_to(root)))[0]: f for f in files}
    reference = np.stack([encoder.embed_file(str(by_uid[u])) for u in uids])
    assert cosine_rows(vectors, reference).min() >= 0.99999
    assert st.verify().ok
    assert st.extract(model=spec, ray="auto").nothing_to_do


# ------------------------------------------------------------------------------ refusals


def test_fingerprint_mismatch_refused_naming_the_node(cluster, tmp_path, monkeypatch):
    # the same hub name, other weights on node 2: its worker refuses, node 1's does it all
    for hub, seed in zip(cluster.hubs, (0, 1)):
        make_wespeaker_dir(hub, arch="campplus", seed=seed, name="campplus")
    monkeypatch.setenv("WESPEAKER_HOME", str(cluster.hubs[0]))  # the driver's, as node 1's
    st, files = scanned(tmp_path, speakers=2, per_speaker=2, seconds=0.4)
    summary = st.extract(model="wespeaker-hub:campplus", ray="auto")
    assert summary.done == len(files) and summary.workers == 1
    node_2 = cluster.nodes[1].node_id[:8]
    assert summary.error.startswith("1 worker(s) failed: node 127.0.0.1 (")
    assert node_2 in summary.error and "fingerprint" in summary.error and "\n" not in summary.error
    assert list(summary.workers_per_node) == [f"node 127.0.0.1 ({cluster.nodes[0].node_id[:8]})"]
    st.close()


@pytest.mark.exhaustive  # ~20-60 s of the Ray group, serial on one worker; the path map itself: test_ray_parts
def test_missing_root_refused_then_path_map_honoured(cluster, tmp_path):
    st, files = scanned(tmp_path, speakers=2, per_speaker=2, seconds=0.4)
    moved = tmp_path / "elsewhere"
    (tmp_path / "root").rename(moved)  # no node has the scanned root any more
    refused = st.extract(model="null:16", ray="auto", workers=2)
    assert refused.done == 0 and refused.error.startswith("workers failed: node 127.0.0.1 (")
    assert f"scan root(s) missing there: {tmp_path / 'root'}" in refused.error
    assert "--path-map" in refused.error and "\n" not in refused.error
    assert st.manifest.query("SELECT count(*) FROM tasks WHERE status = 'claimed'")[0][0] == 0
    mapped = st.extract(model="null:16", ray="auto", workers=2, path_map=(f"{tmp_path / 'root'}={moved}",))
    assert mapped.done == len(files) and not mapped.error
    # the hashes the workers read are those of the files where the map pointed
    from embstore.audio.io import content_hash

    stored = {r["path"]: r["content_hash"] for r in st.manifest.query("SELECT path, content_hash FROM files")}
    assert stored == {str(f.relative_to(tmp_path / "root")): content_hash(str(moved / f.relative_to(tmp_path / "root")))
                      for f in files}
    st.close()


# --------------------------------------------------------------------- deaths and losses


def test_a_poison_item_is_quarantined_on_the_cluster(cluster, tmp_path):
    st, files = scanned(tmp_path, speakers=2, per_speaker=3, seconds=0.3)
    write(tmp_path / "root" / "ds" / "spk1" / f"{POISON}.wav", 0.3, seed=5)
    st.scan([tmp_path / "root"])
    summary = st.extract(model="null:16", ray="auto", workers=2)
    # solo, the poison killed two different workers; a first death in a shared batch (if
    # the claims put it with others) only made suspects, so 2 or 3 losses; replacements
    # took over each time, so one run did it all
    assert summary.done == len(files) and summary.failed == 1 and not summary.error, summary
    lost = sum(t["lost"] for t in summary.workers_per_node.values())
    assert summary.workers >= 3 and lost in (2, 3), summary.workers_per_node
    (error,) = st.errors().failures
    assert error.stage == "crash" and error.id.endswith(POISON) and "2 different workers" in error.error
    workers = json.loads(st.manifest.query("SELECT crashed_workers FROM tasks WHERE stage = 'crash'")[0][0])
    assert len(set(workers)) == 2 and all(w.startswith("ray:") for w in workers)
    st.close()


def kill_worker_of(owner: str) -> None:
    """ray.kill the worker actor whose claims are `owner`'s (ray:<node>:<actor>:<run>)."""
    actor_prefix = owner.split(":")[2]
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if "-worker-" in entry["name"]:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            if actor._actor_id.hex().startswith(actor_prefix):
                ray.kill(actor)
                return
    raise AssertionError(f"no live worker actor for {owner}")


@pytest.mark.exhaustive  # ~40 s; a killed actor is replaced also in the poison-item test
def test_worker_killed_mid_run_is_replaced(cluster, tmp_path, model_dir):
    spec = f"wespeaker:{model_dir}"
    st, files = scanned(tmp_path, speakers=4, per_speaker=5, seconds=1.0)
    store = tmp_path / "store"
    with cluster.computes_held():  # mid-run on any CPU: claims held, nothing computed yet
        thread, out = in_background(lambda: st.extract(model=spec, ray="auto", workers=3))
        wait_for(lambda: claim_owners(store), thread)
        kill_worker_of(claim_owners(store)[0])
    thread.join(timeout=300)
    (summary,) = out
    assert not summary.error and summary.done == len(files), summary
    assert summary.workers == 4  # the killed worker was replaced
    assert sum(t["lost"] for t in summary.workers_per_node.values()) == 1
    check_exactly_once(st, files, tmp_path / "root", spec)
    st.close()


def test_driver_killed_then_next_run_frees_its_claims_at_once(cluster, tmp_path):
    st, files = scanned(tmp_path, speakers=2, per_speaker=6, seconds=0.6)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "embstore", "extract", str(tmp_path / "store"), "--ray", cluster.cluster.address,
           "--workers", "1", "--json"]  # one worker: its claims are what the dead driver leaves
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    store = tmp_path / "store"
    wait_for(lambda: claim_owners(store) or proc.poll() is not None)
    os.killpg(proc.pid, signal.SIGKILL)
    # the driver stays a zombie (nobody reaps it yet) while the next run starts: dead all the same
    wait_for(lambda: open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z")
    # Ray kills what the dead driver created; its claims stay, their leases far ahead
    wait_for(lambda: not [a for a in ray.util.list_named_actors(all_namespaces=True) if "-coordinator" in a["name"]])
    held = peek(store, "SELECT count(*), min(lease_until) FROM tasks WHERE status = 'claimed'")[0]
    assert held[0] > 0 and held[1] > time.time() + 60
    summary = st.extract(ray="auto", workers=1)
    # freed at the start of the next run, not when the leases run out
    assert summary.prepared["released"] == held[0]
    assert not summary.error and summary.left == 0
    assert st.manifest.query("SELECT status FROM runs ORDER BY id")[0][0] == "crashed"
    proc.wait()
    check_exactly_once(st, files, tmp_path / "root", "campplus")  # the default model
    st.close()


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def _cluster_sockets() -> list[tuple[str, str, str]]:
    """(process, local address, remote address) of every TCP socket of this process
    and its children (the cluster's GCS, raylets, workers)."""
    import psutil

    me = psutil.Process()
    out = []
    for proc in [me] + me.children(recursive=True):
        try:
            for c in proc.net_connections(kind="tcp"):
                out.append((proc.name(), c.laddr.ip if c.laddr else "", c.raddr.ip if c.raddr else ""))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


@pytest.mark.exhaustive  # ~45 s in the suite; windows and Ray are each covered on their own there
def test_window_model_on_the_cluster_equals_a_local_run(cluster, tmp_path, speech_corpus):
    """`extract --windows --ray`: every item's windows committed once, equal to a local run's
    (2 utterances of 2 speakers: real, or synthetic speech without ../shared/data)."""
    root = speech_corpus.copy(tmp_path / "root", speakers=2, per_speaker=2)
    local = embstore.open(tmp_path / "local")
    local.scan([root])
    assert local.extract(windows="1.5:0.75").done == 4
    st = embstore.open(tmp_path / "store")
    st.scan([root])
    summary = st.extract(windows="1.5:0.75", ray="auto")
    assert not summary.error and summary.done == 4 and summary.failed == 0, summary
    for (uid,) in st.manifest.query("SELECT uid FROM items"):
        starts, ends, rows = st.windows(uid)
        want = local.windows(uid)
        assert len(starts) > 1 and np.array_equal(starts, want[0]) and np.array_equal(ends, want[1])
        assert cosine_rows(rows, want[2]).min() >= 0.99999
    spans = sorted(tuple(r) for r in st.manifest.query("SELECT row, row + row_count FROM tasks"))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert st.verify().ok
    assert st.extract(windows="1.5:0.75", ray="auto").nothing_to_do
    st.close()
    local.close()


@pytest.mark.exhaustive
def test_node_lost_mid_run_every_item_done_exactly_once(cluster, tmp_path, model_dir):
    spec = f"wespeaker:{model_dir}"
    st, files = scanned(tmp_path, speakers=4, per_speaker=5, seconds=1.0)
    doomed = f"ray:{cluster.nodes[1].node_id[:8]}:"
    store = tmp_path / "store"
    with cluster.computes_held():  # mid-run on any CPU: the doomed node's worker holding claims
        thread, out = in_background(lambda: st.extract(model=spec, ray="auto"))
        wait_for(lambda: any(o.startswith(doomed) for o in claim_owners(store)), thread)
        sockets = _cluster_sockets()
        cluster.cluster.remove_node(cluster.nodes[1], allow_graceful=False)
    thread.join(timeout=300)
    (summary,) = out
    # loopback only, for everything the cluster opened
    assert sockets and not [s for s in sockets if not (is_loopback(s[1]) and (not s[2] or is_loopback(s[2])))]
    assert not summary.error and summary.done == len(files), summary
    # workers on the (fake) GPU nodes only, never the head; the lost one counted. (The
    # survivor may finish before Ray declares the node dead: the lost claims then go
    # to a replacement on the GPU it freed.)
    tallies = summary.workers_per_node
    gpu_nodes = {f"node 127.0.0.1 ({n.node_id[:8]})" for n in cluster.nodes}
    assert set(tallies) == gpu_nodes
    assert tallies[f"node 127.0.0.1 ({cluster.nodes[1].node_id[:8]})"] == {"workers": 1, "devices": {"cpu": 1},
                                                                          "lost": 1}
    # a lost node blames no item
    assert st.manifest.query("SELECT count(*) FROM tasks WHERE suspect = 1 OR crashed_workers IS NOT NULL")[0][0] == 0
    check_exactly_once(st, files, tmp_path / "root", spec)
    from click.testing import CliRunner

    from embstore.cli import cli

    shown = CliRunner().invoke(cli, ["status", str(tmp_path / "store")]).output
    assert "1 worker(s) on 1 x cpu, 1 lost" in shown
    st.close()
