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
from embstore import processes
from embstore.cli import cli
from tests.store_factory import assert_second_run_held_off
from tests.wespeaker_dirs import make_wespeaker_dir

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="the kill loops need Linux")


@pytest.fixture(scope="module")
def ecapa(tmp_path_factory) -> str:
    """A small random ECAPA: ONNX workers start without torch, so a cycle is short."""
    return "wespeaker:" + str(make_wespeaker_dir(tmp_path_factory.mktemp("ecapa"), arch="ecapa"))


def _crash_loop(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "crash_loop.py"), "--out", str(out), "--work", str(tmp_path / "w"),
         *args],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    failed = [c for c in report["cycles"] if not c["one_resume_finished"]]
    assert not failed, failed[:3]
    return report


def _kills_each_finished_by_one_resume(tmp_path: Path, shared_data: Path, ecapa: str, kills: int) -> None:
    # one worker: the whole group is still parent, writer and worker, one process fewer to start
    report = _crash_loop(tmp_path, "--kills", str(kills), "--per-batch", "2", "--delay", "0.3", "--seed", "1",
                         "--workers", "1", "--source", str(shared_data), "--model", ecapa)
    assert report["subreaper"] and report["kills"] == kills
    assert report["kills_with_claims_held"] == kills and report["kills_while_running"] == kills
    # every resume ran while the killed processes were still zombies, and finished alone
    assert report["resumes_with_zombies"] == kills and report["resumes_exit_0_all_done"] == kills
    # mostly the claims' own workers, unreaped; near the end of a run the worker may have
    # exited (reaped by its parent) with its last claims waiting on the writer's commit:
    # then the owner is gone rather than a zombie, and the resume takes the claims over alike
    assert report["resumes_with_zombie_claim_owners"] >= kills // 2, report["cycles"]
    # a run that finished before its kill moment (a fast machine) is followed by another
    # batch and run in the same cycle: two more items and one more finished run each
    missed = report["missed_kills"]
    assert report["batches"] == kills + missed and missed <= kills // 2, report["cycles"]
    assert report["done"] == report["items"] == 2 * (kills + missed) and report["reference"] == "embed_file"
    assert report["min_cosine"] >= 0.99999 and report["compared"] == report["items"]
    assert report["checks_ok"] and report["verify_ok"] and not report["overlapping_rows"]
    assert report["items_blamed_for_kills"] == 0
    assert report["runs_by_status"] == {"crashed": kills, "finished": kills + missed}


@pytest.mark.slow
@pytest.mark.long
def test_three_kills_each_finished_by_one_resume(tmp_path, shared_data, ecapa):
    # three in the default suite; twenty in `make test-exhaustive`
    _kills_each_finished_by_one_resume(tmp_path, shared_data, ecapa, kills=3)


@pytest.mark.exhaustive
def test_twenty_kills_each_finished_by_one_resume(tmp_path, shared_data, ecapa):
    _kills_each_finished_by_one_resume(tmp_path, shared_data, ecapa, kills=20)


@pytest.mark.slow
def test_window_model_kills_each_finished_by_one_resume(tmp_path, speech_corpus, ecapa):
    # real utterances, or synthetic speech (silero finds it) without ../shared/data
    report = _crash_loop(tmp_path, "--kills", "2", "--per-batch", "2", "--delay", "0.3", "--seed", "2",
                         "--source", str(speech_corpus.path), "--model", ecapa, "--windows", "1.5:0.75",
                         # each claim computes 1 s longer than the 0.3 s kill delay: on a fast
                         # machine a run of 4 short items otherwise ends before its second kill
                         env={"EMBSTORE_FAULT_SLOW_COMPUTE": "1"})
    assert report["kills_with_claims_held"] == 2 and report["resumes_with_zombie_claim_owners"] == 2
    assert report["resumes_exit_0_all_done"] == 2 and report["done"] == report["items"] == 4
    # every item's windows: the same spans and rows as a clean undisturbed run
    assert report["reference"] == "a clean run" and report["compared"] == 4 and report["min_cosine"] >= 0.99999
    assert report["checks_ok"] and report["items_blamed_for_kills"] == 0


# -- another run still holds claims ----------------------------------------------------------

HOLDER = """
import sys, time
import embstore
from embstore.manifest import runs, tasks
st = embstore.open(sys.argv[1])
model_id = st.manifest.query("SELECT id FROM models")[0][0]
owner = tasks.new_owner()
runs.start_run(st.manifest.conn, model_id, {"holder": True})
held = tasks.claim_batch(st.manifest.conn, model_id, owner, 3600, 3, 10**9)
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
    assert st.manifest.query("SELECT count(*) FROM tasks WHERE status = 'done'")[0][0] == 10
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
    assert st.manifest.query("SELECT count(*) FROM tasks WHERE status != 'pending'")[0][0] == 0
    assert st.errors().failures == []
    st.close()
    # the same for `extract --vad silero`, and the library raises it as an environment problem
    res = runner.invoke(cli, ["extract", str(store), "--vad", "silero"])
    assert res.exit_code == 4 and "pip install 'silero-vad>=6'" in res.output


def test_failures_stored_for_a_missing_package_are_retried_unasked(tmp_path, two_files):
    store = tmp_path / "s"
    st = embstore.open(store)
    st.scan([two_files])
    st.extract(vad="silero", progress=False)
    assert st.manifest.query("SELECT count(*) FROM tasks WHERE status = 'done'")[0][0] == 2
    # what an older version stored when silero-vad was missing: both items "failed"
    with st.manifest.write() as conn:
        conn.execute("UPDATE tasks SET status = 'failed', stage = 'vad', row = NULL, error = 'VadError: --vad silero"
                     " needs the silero-vad package: pip install --no-deps silero-vad'")
    summary = st.extract(vad="silero", progress=False)
    assert summary.done == 2 and summary.outcome.exit_status == 0, summary
    assert summary.prepared["environment"] == 2
    st.close()


# -- what the quick paths and the outcome must not miss -----------------------------------


def test_an_item_back_below_the_high_water_mark_is_work(tmp_path):
    """An item that had no task when later ones got theirs (it was missing at the first
    extract, then came back): not "nothing to do", whatever the task states say."""
    from tests.audio_factory import make_tree

    files = make_tree(tmp_path / "root", speakers=1, per_speaker=3, seconds=1.6)
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "root"])
    kept = files[0].read_bytes()
    files[0].unlink()
    st.scan([tmp_path / "root"])
    assert st.extract(progress=False).outcome.exit_status == 0
    files[0].write_bytes(kept)
    st.scan([tmp_path / "root"])
    summary = st.extract(progress=False)
    assert not summary.nothing_to_do and summary.done == 1 and summary.outcome.exit_status == 0, summary
    st.close()


def test_a_store_that_cannot_be_read_after_the_run_is_not_success(tmp_path, monkeypatch):
    from embstore.extract import monitor
    from tests.audio_factory import make_tree

    make_tree(tmp_path / "root", speakers=1, per_speaker=1, seconds=1.6)
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "root"])

    def unreadable(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(monitor, "coverage", unreadable)
    outcome = st.extract(progress=False).outcome
    assert outcome.exit_status == 4 and "cannot read the store: disk I/O error" in outcome.error
    st.close()


def test_a_vad_package_that_fails_to_import_stops_the_run_before_any_claim(tmp_path, monkeypatch):
    """Installed but broken (its compiled part missing): found at plan time, not by each
    item in turn; nothing is recorded against the items."""
    from tests.audio_factory import make_tree

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "webrtcvad.py").write_text("import _webrtcvad_missing_extension\n")
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.delitem(sys.modules, "webrtcvad", raising=False)
    make_tree(tmp_path / "root", speakers=1, per_speaker=2, seconds=1.6)
    store = tmp_path / "s"
    assert CliRunner().invoke(cli, ["scan", str(store), str(tmp_path / "root")]).exit_code == 0
    res = CliRunner().invoke(cli, ["extract", str(store), "--vad", "webrtc"])
    assert res.exit_code == 4, res.output
    assert "the webrtc VAD needs the webrtcvad package, which cannot be imported" in res.output
    st = embstore.open(store)
    assert st.manifest.query("SELECT count(*) FROM tasks WHERE status != 'pending'")[0][0] == 0
    st.close()


def test_ctrl_c_outside_the_workers_exits_130(tmp_path, monkeypatch):
    from embstore.store import Store

    def interrupted(self, **options):
        raise KeyboardInterrupt

    embstore.open(tmp_path / "s").close()
    monkeypatch.setattr(Store, "extract", interrupted)
    res = CliRunner().invoke(cli, ["extract", str(tmp_path / "s")])
    assert res.exit_code == 130 and "interrupted" in res.output, res.output


@pytest.mark.slow
def test_parent_alone_killed_its_workers_die_with_it_and_one_resume_finishes(tmp_path, shared_data, ecapa):
    """kill -9 of the `extract` process only (an OOM killer's choice): its writer and
    workers do not live on holding claims, so the next command does the work and exits 0."""
    root = tmp_path / "root" / "ds" / "spk"
    root.mkdir(parents=True)
    for f in sorted(shared_data.rglob("*.flac"))[:40]:  # more work than the orphans could finish in 3 s
        os.symlink(f, root / f.name)
    store = tmp_path / "s"
    embstore.open(store).scan([tmp_path / "root"])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "embstore", "extract", str(store), "--model", ecapa, "--workers", "2", "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not _claimed_by(store) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.003)
    owners = list(_claimed_by(store))
    assert owners, "the run ended before any claim"
    os.kill(proc.pid, signal.SIGKILL)  # the parent only
    proc.wait()
    pids = {int(o.split(":")[1]) for o in owners}
    deadline = time.monotonic() + 3
    while any(processes.is_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(processes.is_running(pid) for pid in pids), "a worker outlived its run's parent"
    assert _claimed_by(store), "the orphans finished the work: the test proves nothing"
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["outcome"]["done"] == 40


@pytest.mark.slow
def test_claims_stay_held_while_their_last_batch_computes(tmp_path, shared_data, ecapa, monkeypatch):
    """A claim whose compute outlasts its lease (a long item on a slow device) is renewed
    until its results are handed to the writer: a second run started meanwhile takes
    none of it (it says they are held: exit 5), and nothing is computed twice. (The
    feeder waits for the compute side before it ends, so renewals never stopped early
    here; this holds the property, now that renewals last until the hand-over.)"""
    import threading

    root = tmp_path / "root" / "ds" / "spk"
    root.mkdir(parents=True)
    for f in sorted(shared_data.rglob("*.flac"))[:3]:
        os.symlink(f, root / f.name)
    store = tmp_path / "s"
    st = embstore.open(store)
    st.scan([tmp_path / "root"])
    st.extract(model=ecapa, limit=1, progress=False)  # model known, one item done
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # each claim computes until the second run has come and gone: past the 2 s lease, however
    # long a loaded machine takes to start that second Python process
    release = tmp_path / "release-compute"
    monkeypatch.setenv("EMBSTORE_FAULT_HOLD_COMPUTE", str(release))
    out = []
    first = threading.Thread(target=lambda: out.append(
        st.extract(model=ecapa, workers=1, lease_seconds=2.0, progress=False)))
    first.start()
    deadline = time.monotonic() + 60
    while not _claimed_by(store) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(3.0)  # the first run's 2 s lease would have run out by now
    env.pop("EMBSTORE_FAULT_HOLD_COMPUTE", None)  # the second run computes at once
    try:
        second = subprocess.run([sys.executable, "-m", "embstore", "extract", str(store), "--model", ecapa, "--json"],
                                env=env, capture_output=True, text=True, timeout=120)
    finally:
        release.touch()
    first.join(timeout=120)
    (summary,) = out
    assert_second_run_held_off(st, summary, second)
    st.close()
