"""One item embedder for whole items and windows (`extract/worker.ItemEmbedder`), through
real runs with the worker's fault hooks (`extract/faults.py`):

- a window block in which one item's windows raise fails that item alone, with its
  reason; its block neighbours are done;
- an out-of-memory in a window block halves it (short items and a long item featurised
  block by block alike) and every item is still embedded, to the rows of a run without
  any fault; a window that runs out of memory alone fails its item;
- whole items keep the same behaviour: a bad item fails alone, an out-of-memory halves
  down to single items, and one out of memory alone fails;
- a long window item keeps its lease while its claim computes.

Synthetic voices only (tests/audio_factory.py): no ../shared/data needed.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import embstore
from embstore.api import Failure
from embstore.extract.faults import EMBED_PATHS, OOM_ABOVE, HOLD_COMPUTE
from embstore.models.registry import load
from embstore.segments.policy import EAGER_WINDOWS
from embstore.segments.window_embed import WindowEmbedder
from embstore.segments.windows import windows_in_regions
from tests.audio_factory import write
from tests.store_factory import assert_second_run_held_off

ROOT = Path(__file__).resolve().parent.parent
NULL = "null:16"  # real fbank features, a network that costs nothing: fast runs
SHORT = "1.5:0.75"
TINY = (0.1, 0.05)  # windows of 0.1 s every 0.05 s: a 30 s item is a long item


def _store(tmp_path: Path, seconds: dict[str, float]):
    """A store of synthetic voices ROOT/ds/spk/<name>.wav, each of its own length and
    voice (no two share audio, so no dedup hides a failure), scanned."""
    for k, (name, length) in enumerate(seconds.items()):
        write(tmp_path / "root" / "ds" / "spk" / f"{name}.wav", length, pitch=110 + 15 * k, seed=k)
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "root"])
    return st


def _statuses(st) -> dict[str, str]:
    """Each item's task status, by file name (uids are ds/spk/<name>)."""
    return {uid.rsplit("/", 1)[-1]: status for uid, status in st.manifest.query(
        "SELECT i.uid, t.status FROM tasks t JOIN items i ON i.id = t.item_id")}


def _errors(st, model: str) -> dict[str, Failure]:
    return {e.id.rsplit("/", 1)[-1]: e for e in st.errors(model=model).failures}


def test_one_bad_item_in_a_window_block_fails_alone(tmp_path, monkeypatch):
    """Four items in one claim, their windows in one block (12 < the block's 128): the
    block raises because of one item's windows; only that item fails, with its reason."""
    st = _store(tmp_path, {"a": 3.0, "chokes": 3.0, "c": 3.0, "d": 3.0})
    monkeypatch.setenv(EMBED_PATHS, "chokes")  # a marker in no test's tmp_path
    summary = st.extract(model=NULL, windows=SHORT, vad="none", workers=1, progress=False)
    assert (summary.done, summary.failed) == (3, 1), summary
    errors = _errors(st, summary.model)
    assert set(errors) == {"chokes"}, errors
    assert errors["chokes"].stage == "model" and "injected embedding fault" in errors["chokes"].error
    for name in ("a", "c", "d"):
        starts, _, rows = st.windows(name, model=summary.model)
        assert len(starts) == 3 and np.isfinite(rows).all()
    # the neighbours' forwards: one per item after the shared block raised (3 windows each)
    assert summary.mean_batch_items == 3, summary
    st.close()


def test_out_of_memory_in_window_blocks_halves_and_embeds_every_item(tmp_path, monkeypatch):
    """Resemblyzer's packed windows, three short items (~40 windows each, blocks of 128
    windows across items) and one long item (529 windows, featurised block by block on
    the compute side): every block over 40 windows runs out of memory. Blocks halve
    until they fit; every window of every item is embedded, equal to a run without
    faults (each window's row depends on its own samples only)."""
    lengths = {"s1": 2.0, "s2": 2.1, "s3": 2.07, "long": 26.5}
    st = _store(tmp_path, lengths)
    monkeypatch.setenv(OOM_ABOVE, "40")
    spec = f"{TINY[0]}:{TINY[1]}"
    # Resemblyzer: its packed window forward (mode "mel") is the path under test
    summary = st.extract(model="resemblyzer", windows=spec, vad="none", workers=1, progress=False)
    assert (summary.done, summary.failed) == (4, 0), (summary, st.errors(model=summary.model))
    assert 1 < summary.mean_batch_items <= 40, summary
    encoder = load("resemblyzer")
    reference = WindowEmbedder(encoder)
    assert reference.mode == "mel"  # the encoder's declared packed forward
    for name in lengths:
        wav = encoder.load(str(tmp_path / "root" / "ds" / "spk" / f"{name}.wav"))
        duration = len(wav) / encoder.sample_rate
        plan = windows_in_regions([(0.0, duration)], *TINY, duration)
        assert (len(plan) > EAGER_WINDOWS) == (name == "long")
        starts, _, rows = st.windows(name, model=summary.model)
        assert len(starts) == len(plan)  # no window lost
        assert np.abs(rows - reference.embed(wav, plan)).max() < 1e-5
    st.close()


def test_a_window_out_of_memory_alone_fails_its_item(tmp_path, monkeypatch):
    st = _store(tmp_path, {"a": 3.0, "b": 3.0, "long": 30.0})
    monkeypatch.setenv(OOM_ABOVE, "0")
    summary = st.extract(model=NULL, windows=f"{TINY[0]}:{TINY[1]}", vad="none", workers=1, progress=False)
    assert (summary.done, summary.failed) == (0, 3), summary
    errors = _errors(st, summary.model)
    assert {e.error for e in errors.values()} == {"out of memory (even alone)"}, errors
    st.close()


@pytest.mark.parametrize("fault, value, done, reason", [
    (EMBED_PATHS, "chokes", 3, "injected embedding fault"),  # a bad item fails alone
    (OOM_ABOVE, "1", 4, None),  # out of memory: halved down to single items, all done
    (OOM_ABOVE, "0", 0, "out of memory (even alone)"),
], ids=["bad-item", "oom-halves", "oom-alone"])
def test_whole_items_keep_their_failure_behaviour(tmp_path, monkeypatch, fault, value, done, reason):
    st = _store(tmp_path, {"a": 1.0, "chokes": 1.1, "c": 1.2, "d": 1.3})
    monkeypatch.setenv(fault, value)
    summary = st.extract(model=NULL, workers=1, progress=False)
    assert (summary.done, summary.failed) == (done, 4 - done), summary
    errors = _errors(st, summary.model)
    assert len(errors) == 4 - done and all(reason in e.error for e in errors.values()), errors
    if fault == OOM_ABOVE and done:
        assert summary.mean_batch_items == 1, summary
    if fault == EMBED_PATHS:
        assert set(errors) == {"chokes"}
    st.close()


def _claimed(store: Path) -> list[str]:
    try:
        conn = sqlite3.connect(str(store / "manifest.db"), timeout=30)
        try:
            return [r[0].rsplit("/", 1)[-1] for r in conn.execute(
                "SELECT i.uid FROM tasks t JOIN items i ON i.id = t.item_id WHERE t.status = 'claimed'")]
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the run has not created its tables yet
        return []


@pytest.mark.slow
def test_a_long_window_item_keeps_its_lease_while_it_computes(tmp_path, monkeypatch):
    """tests/test_resume.py holds this for whole items; here the claim holds a long window
    item (featurised block by block on the compute side): a second run started after the
    first run's lease would have run out takes none of it (exit 5, held), and nothing is
    claimed twice."""
    st = _store(tmp_path, {"long": 30.0, "short": 2.0})
    spec = f"{TINY[0]}:{TINY[1]}"
    # each claim computes until the second run has come and gone: past the 2 s lease, however
    # long a loaded machine takes to start that second Python process
    release = tmp_path / "release-compute"
    monkeypatch.setenv(HOLD_COMPUTE, str(release))
    out = []
    first = threading.Thread(target=lambda: out.append(
        st.extract(model=NULL, windows=spec, vad="none", workers=1, lease_seconds=2.0, progress=False)))
    first.start()
    deadline = time.monotonic() + 60
    while "long" not in _claimed(tmp_path / "s") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "long" in _claimed(tmp_path / "s"), "the long item was never claimed"
    time.sleep(3.0)  # the first run's 2 s lease would have run out by now
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop(HOLD_COMPUTE)
    try:
        second = subprocess.run([sys.executable, "-m", "embstore", "extract", str(tmp_path / "s"), "--model", NULL,
                                 "--windows", spec, "--vad", "none", "--json"],
                                env=env, capture_output=True, text=True, timeout=120)
    finally:
        release.touch()
    first.join(timeout=120)
    (summary,) = out
    assert_second_run_held_off(st, summary, second)
    assert _statuses(st) == {"long": "done", "short": "done"}
    assert len(st.windows("long", model=summary.model)[0]) > EAGER_WINDOWS  # it took the long path
    st.close()
