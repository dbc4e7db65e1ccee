"""Window extraction killed with -9, mid-run, then resumed: an item's windows are
committed together or not at all, and the resumed store equals a clean one."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

import embstore
from embstore.vectors import cosine_rows

SPEC = "1.5:0.75"


@pytest.fixture(scope="module")
def corpus(speech_corpus, tmp_path_factory):
    """12 utterances of 3 speakers (real, or synthetic without ../shared/data), and their
    windows from an uninterrupted run."""
    root = speech_corpus.copy(tmp_path_factory.mktemp("wcrash") / "root", speakers=3, per_speaker=4)
    st = embstore.open(root.parent / "clean")
    st.scan([root])
    summary = st.extract(windows=SPEC)
    assert summary.done == 12 and summary.failed == 0
    clean = {uid: st.windows(uid) for (uid,) in st.manifest.query("SELECT uid FROM items ORDER BY uid")}
    st.close()
    return root, clean


def _tasks(store) -> list[tuple]:
    conn = sqlite3.connect(str(store / "manifest.db"), timeout=30)
    try:
        return conn.execute(
            "SELECT i.uid, t.status, t.row, coalesce(t.row_count, 1) FROM tasks t JOIN items i ON i.id = t.item_id"
        ).fetchall()
    except sqlite3.OperationalError:  # the run has not created its tables yet
        return []
    finally:
        conn.close()


def _count(store, status: str) -> int:
    return sum(1 for t in _tasks(store) if t[1] == status)


def _same_windows(got: tuple, want: tuple) -> None:
    starts, ends, rows = got
    assert np.array_equal(starts, want[0]) and np.array_equal(ends, want[1])
    assert cosine_rows(rows, want[2]).min() >= 0.99999


@pytest.mark.slow
@pytest.mark.exhaustive  # tests/test_resume.py kills window runs, each resumed once
def test_window_run_killed_then_resumed(corpus, tmp_path):
    root, clean = corpus
    store = tmp_path / "s"
    embstore.open(store).scan([root])
    cmd = [sys.executable, "-m", "embstore", "extract", str(store), "--windows", SPEC, "--device", "cpu",
           "--workers", "2", "--batch-frames", "800", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    kills_mid_run = 0
    rng = np.random.default_rng(0)
    for _ in range(2):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 120
        while _count(store, "claimed") == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.2, 1.5))
        if proc.poll() is None and _count(store, "done") < len(clean):
            kills_mid_run += 1
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of everything: parent, workers, writer
        except ProcessLookupError:
            pass
        proc.wait()
        # after the kill, every item that reads as done has all its windows, as the clean run
        st = embstore.open(store)
        for uid, status, _, _ in _tasks(store):
            if status == "done":
                _same_windows(st.windows(uid), clean[uid])
        st.close()
    assert kills_mid_run >= 1
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    st = embstore.open(store)
    tasks = _tasks(store)
    assert sorted(t[0] for t in tasks) == sorted(clean) and all(t[1] == "done" for t in tasks)
    # each item's block of rows is its own: no two items' windows overlap
    spans = sorted((row, row + count) for _, _, row, count in tasks)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    for uid in clean:
        _same_windows(st.windows(uid), clean[uid])
    report = st.verify()
    assert report.ok, report.as_dict()
    st.close()
