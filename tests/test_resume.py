"""One command finishes a killed run, and no command says "done" with work undone.

- 20 kill -9 of the whole `extract` process group, each while its workers hold claims,
  each followed at once by exactly one resume while the killed processes are still
  zombies (benchmarks/crash_loop.py, whose process is their subreaper): every resume
  exits 0 with every item done once, vectors equal to `embed_file`;
- the same for a window model (3 kills);
- a run killed while another live run holds claims: one resume takes none of the live
  claims and exits 5 saying so; once that run is gone too, one more resume finishes;
- a VAD package that is not installed stops `diarize` at plan time with one line and
  exit 4, recording nothing against the items; failures older versions stored for
  that reason are retried unasked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import embstore
from embstore.cli import cli
from tests.wespeaker_dirs import make_wespeaker_dir

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="the kill loops need Linux")


@pytest.fixture(scope="module")
def ecapa(tmp_path_factory) -> str:
    """A small random ECAPA: ONNX workers start without torch, so a cycle is short."""
    return "wespeaker:" + str(make_wespeaker_dir(tmp_path_factory.mktemp("ecapa"), arch="ecapa"))


def _crash_loop(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "crash_loop.py"), "--out", str(out), "--work", str(tmp_path / "w"),
         *args],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    failed = [c for c in report["cycles"] if not c["one_resume_finished"]]
    assert not failed, failed[:3]
    return report


@pytest.mark.slow
@pytest.mark.long
def test_twenty_kills_each_finished_by_one_resume(tmp_path, shared_data, ecapa):
    # one worker: the whole group is still parent, writer and worker, one process fewer to start
    report = _crash_loop(tmp_path, "--kills", "20", "--per-batch", "2", "--delay", "0.3", "--seed", "1",
                         "--workers", "1", "--source", str(shared_data), "--model", ecapa)
    assert report["subreaper"] and report["kills"] == 20
    assert report["kills_with_claims_held"] == 20 and report["kills_while_running"] == 20
    # every resume ran while the killed processes were still zombies, and finished alone
    assert report["resumes_with_zombies"] == 20 and report["resumes_exit_0_all_done"] == 20
    assert report["done"] == report["items"] == 40 and report["reference"] == "embed_file"
    assert report["min_cosine"] >= 0.99999 and report["compared"] == 40
    assert report["checks_ok"] and report["verify_ok"] and not report["overlapping_rows"]
    assert report["items_blamed_for_kills"] == 0 and report["runs_by_status"] == {"crashed": 20, "finished": 20}


@pytest.mark.slow
def test_window_model_kills_each_finished_by_one_resume(tmp_path, shared_data, ecapa):
    report = _crash_loop(tmp_path, "--kills", "3", "--per-batch", "2", "--delay", "0.3", "--seed", "2",
                         "--source", str(shared_data), "--model", ecapa, "--windows", "1.5:0.75")
    assert report["kills_with_claims_held"] == 3 and report["resumes_with_zombies"] == 3
    assert report["resumes_exit_0_all_done"] == 3 and report["done"] == report["items"] == 6
    # every item's windows: the same spans and rows as a clean undisturbed run
    assert report["reference"] == "a clean run" and report["compared"] == 6 and report["min_cosine"] >= 0.99999
    assert report["checks_ok"] and report["items_blamed_for_kills"] == 0


# -- another run still holds claims ----------------------------------------------------------

HOLDER = """
import sys, time
import embstore
from embstore.manifest import runs, tasks
st = embstore.open(sys.argv[1])
model_id = st.query("SELECT id FROM models")[0][0]
owner = tasks.new_owner()
runs.start_run(st.conn, model_id, {"holder": True})
held = tasks.claim_batch(st.conn, model_id, owner, 3600, 3, 10**9)
print(len(held), flush=True)
time.sleep(600)
"""


def _claimed_by(store: Path) -> dict[str, int]:
    conn = sqlite3.connect(str(store / "manifest.db"), timeout=30)
    try:
        return dict(conn.execute("SELECT owner, count(*) FROM tasks WHERE status = 'claimed' GROUP BY owner"))
    finally:
        conn.close()


@pytest.mark.slow
def test_live_claims_of_another_run_are_neither_taken_nor_reported_done(tmp_path, shared_data, ecapa):
    files = sorted(shared_data.rglob("*.flac"))[:10]
    root = tmp_path / "root" / "ds"
    for f in files:
        (root / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.symlink(f, root / f.parent.name / f.name)
    store = tmp_path / "s"
    st = embstore.open(store)
    st.scan([tmp_path / "root"])
    st.extract(model=ecapa, limit=1, progress=False)  # the model and its tasks exist
    st.close()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "3"
        (live_owner,) = _claimed_by(store)
        cmd = [sys.executable, "-m", "embstore", "extract", str(store), "--model", ecapa, "--workers", "2", "--json"]
        killed = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        deadline = time.monotonic() + 120
        while len(_claimed_by(store)) < 2 and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.003)
        os.killpg(killed.pid, signal.SIGKILL)
        resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        killed.wait()
        # the live run's three claims are untouched, everything else is done, and it says so
        assert _claimed_by(store) == {live_owner: 3}
        assert resumed.returncode == 5, resumed.stderr
        assert f"3 items left: 3 held by another run still running (pid {holder.pid} on " in resumed.stderr
        summary = json.loads(resumed.stdout)
        assert summary["outcome"] | {"why_left": ""} == {
            "done": 7, "failed": 0, "left": 3, "why_left": "", "reason": None, "error": None, "interrupted": False,
            "noun": "items", "exit_status": 5}
    finally:
        holder.kill()
    # the holder dies too (and stays a zombie while the next run starts): its claims are work now
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    holder.wait()
    assert again.returncode == 0, again.stderr
    st = embstore.open(store)
    assert st.query("SELECT count(*) FROM tasks WHERE status = 'done'")[0][0] == 10
    st.close()


# -- a machine without the VAD package -------------------------------------------------------


def _hide_silero(monkeypatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "silero_vad" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.fixture
def two_files(tmp_path, shared_data) -> Path:
    root = tmp_path / "root" / "ds" / "spk"
    root.mkdir(parents=True)
    for f in sorted(shared_data.rglob("*.flac"))[:2]:
        os.symlink(f, root / f.name)
    return tmp_path / "root"


def test_diarize_without_the_vad_package_stops_at_plan_time(tmp_path, two_files, monkeypatch):
    store = tmp_path / "s"
    runner = CliRunner()
    assert runner.invoke(cli, ["scan", str(store), str(two_files)]).exit_code == 0
    _hide_silero(monkeypatch)
    rttm = tmp_path / "out.rttm"
    res = runner.invoke(cli, ["diarize", str(store), "--rttm", str(rttm)])
    assert res.exit_code == 4, res.output
    lines = res.output.strip().splitlines()
    assert lines == ["Error: the silero VAD needs the silero-vad package, which is not installed:"
                     " pip install 'silero-vad>=6' (or reinstall embstore), then run the command again"]
    assert not rttm.exists()
    st = embstore.open(store)
    assert st.query("SELECT count(*) FROM tasks WHERE status != 'pending'")[0][0] == 0
    assert st.errors() == []
    st.close()
    # the same for `extract --vad silero`, and the library raises it as an environment problem
    res = runner.invoke(cli, ["extract", str(store), "--vad", "silero"])
    assert res.exit_code == 4 and "pip install 'silero-vad>=6'" in res.output


def test_failures_stored_for_a_missing_package_are_retried_unasked(tmp_path, two_files):
    store = tmp_path / "s"
    st = embstore.open(store)
    st.scan([two_files])
    st.extract(vad="silero", progress=False)
    assert st.query("SELECT count(*) FROM tasks WHERE status = 'done'")[0][0] == 2
    # what an older version stored when silero-vad was missing: both items "failed"
    with st.write() as conn:
        conn.execute("UPDATE tasks SET status = 'failed', stage = 'vad', row = NULL, error = 'VadError: --vad silero"
                     " needs the silero-vad package: pip install --no-deps silero-vad'")
    summary = st.extract(vad="silero", progress=False)
    assert summary.done == 2 and summary.outcome.exit_status == 0, summary
    assert summary.prepared["environment"] == 2
    st.close()
