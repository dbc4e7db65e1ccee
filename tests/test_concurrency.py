"""Concurrency: readers and `scan` against a store while `extract` writes to it.

(Two `extract` commands on one store: tests/test_extract.py::test_two_extract_commands_at_once.)

One extract subprocess runs; meanwhile this process reads in a loop (`embeddings()`,
`status()`, `verify`) and scans new files into the tree. Readers must never fail nor
see a half-written row; the files scanned mid-run are embedded by that same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import embstore
from embstore.verify import verify_store
from tests.audio_factory import make_tree, write


def _count(store: Path, sql: str) -> int:
    import sqlite3

    try:
        conn = sqlite3.connect(str(store / "manifest.db"), timeout=30)
        try:
            return conn.execute(sql).fetchone()[0]
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return 0


class Reader(threading.Thread):
    """Reads the store in a loop until stopped; records what it saw and any error."""

    def __init__(self, store: Path):
        super().__init__(daemon=True)
        self.store = store
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.reads = 0
        self.verifies = 0
        self.seen_done: list[int] = []
        self.rows: dict[str, np.ndarray] = {}  # each done item's row as first read

    def run(self) -> None:
        st = embstore.open(self.store, create=False)
        last_done = 0
        try:
            while not self.stop.is_set():
                try:
                    status = st.status()
                    done = sum(m["done"] for m in status.models.values())
                    if done < last_done:
                        self.errors.append(f"done went back from {last_done} to {done}")
                    last_done = done
                    if not status.models:
                        time.sleep(0.05)
                        continue
                    ids, vectors = st.embeddings()
                    if len(ids) != len(set(ids)):
                        self.errors.append("an item listed twice")
                    if len(ids) and not (np.isfinite(vectors).all() and (np.abs(vectors).sum(1) > 0).all()):
                        self.errors.append(f"a half-written or empty row among {len(ids)} done items")
                    for item_id, vector in zip(ids, vectors):  # a row, once seen done, never changes
                        first = self.rows.setdefault(item_id, vector.copy())
                        if not np.array_equal(first, vector):
                            self.errors.append(f"{item_id}: its row changed after it was reported done")
                    self.seen_done.append(len(ids))
                    self.reads += 1
                    if self.reads % 10 == 0:
                        report = verify_store(st.manifest)
                        self.verifies += 1
                        if not report.ok:
                            self.errors.append(f"verify during the run: {[p.message for p in report.problems]}")
                except Exception as exc:  # anything at all is a failure of this test
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.02)
        finally:
            st.close()


@pytest.mark.slow
@pytest.mark.exhaustive
def test_readers_and_scan_while_extract_runs(tmp_path):
    root = tmp_path / "root"
    make_tree(root, speakers=2, per_speaker=5, seconds=1.3)
    store = tmp_path / "s"
    st = embstore.open(store)
    st.scan([root])
    st.close()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, "-m", "embstore", "extract", str(store), "--device", "cpu", "--workers", "1", "--json",
         "--batch-frames", "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    reader = None
    try:
        deadline = time.monotonic() + 120
        while _count(store, "SELECT count(*) FROM models") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        reader = Reader(store)
        reader.start()
        while _count(store, "SELECT count(*) FROM tasks WHERE status IN ('claimed', 'done')") == 0 \
                and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        # new files arrive while the run is busy: scanned from this process
        late = [write(root / "ds" / "spk7" / f"late-{k}.wav", 1.1 + 0.1 * k, pitch=210, seed=70 + k) for k in range(3)]
        scanner = embstore.open(store)
        report = scanner.scan([root])
        scanner.close()
        assert report.added == 3
        scanned_at = _count(store, "SELECT count(*) FROM tasks WHERE status = 'done'")
        running_at_scan = proc.poll() is None
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        if reader is not None:
            reader.stop.set()
            reader.join(timeout=60)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert running_at_scan and scanned_at < 10, "the run had finished before the scan: nothing to show"
    # the running extract picked the late files up (it looks again before it stops)
    assert summary["done"] == 13 and summary["left"] == 0, summary
    assert reader.errors == []
    assert reader.reads >= 5 and reader.verifies >= 1
    assert reader.seen_done == sorted(reader.seen_done) and reader.seen_done[-1] >= 1
    with embstore.open(store) as st:
        ids, vectors = st.embeddings()
        assert {f"ds/spk7/{p.stem}" for p in late} <= set(ids)
        assert verify_store(st.manifest).ok
    # what readers saw during the run is what the finished store holds (no half-written row)
    final = dict(zip(ids, vectors))
    assert reader.rows and all(np.array_equal(v, final[i]) for i, v in reader.rows.items())


def test_writer_commits_a_finished_workers_results_before_freeing_its_claims(tmp_path):
    """A worker's last results may still sit in the writer's buffer when the worker
    ends: its claims must be freed after they are committed, never before (they would
    be dropped as no longer held, and the run would end with work left undone)."""
    import queue

    from embstore.extract.client import SqliteManifestClient
    from embstore.extract.messages import ItemResult, ResultBatch, WorkerFinished
    from embstore.extract.writer import writer_main
    from embstore.manifest.tasks import new_owner
    from tests.store_factory import fake_model_description, make_tree as tiny_tree

    tiny_tree(tmp_path / "audio", speakers=1, per_speaker=5)
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "audio"])
    model = st.manifest.register_model(fake_model_description(dim=8))
    owner = new_owner()
    client = SqliteManifestClient(st.path, model.id, owner, 600, "length", lambda n: 1, 16000)
    client.refresh()
    claimed = client.claim(100, 10**9)
    client.close()
    assert len(claimed) == 5
    inbox, progress = queue.Queue(), queue.Queue()
    rng = np.random.default_rng(0)
    # results for four items, the fifth was claimed but never computed (a stop)
    inbox.put(ResultBatch([ItemResult(t.task_id, t.item_id, owner, None, 1.0, rng.standard_normal(8).astype(np.float32))
                           for t in claimed[:4]]))
    inbox.put(WorkerFinished(0, owner))
    writer_main(str(st.path), model.id, None, inbox, progress, 1)
    states = dict(st.manifest.query("SELECT item_id, status FROM tasks"))
    assert [states[t.item_id] for t in claimed] == ["done"] * 4 + ["pending"]
    assert verify_store(st.manifest).ok
    st.close()
