"""The extraction pipeline end to end on CPU, with the default model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import embstore
from embstore.cli import cli
from embstore.vectors import cosine_rows
from tests.audio_factory import make_tree, write




@pytest.fixture(scope="module")
def encoder():
    from embstore.models import load

    return load(None)  # the default model, which st.extract() uses


def done_tasks(st):
    return st.manifest.query(
        "SELECT t.item_id, t.row, t.status FROM tasks t JOIN items i ON i.id = t.item_id WHERE i.removed = 0"
    )


def check_consistent(st):
    """Every live item done once, rows distinct and inside the committed count, ids match."""
    rows = done_tasks(st)
    assert rows and all(r["status"] == "done" for r in rows)
    model = st.models()[0]
    row_numbers = [r["row"] for r in rows]
    assert len(set(row_numbers)) == len(row_numbers)
    assert max(row_numbers) < model.rows
    _, ids = st.manifest.model_arrays(model).arrays()
    stored = ids[: model.rows]
    for r in rows:
        assert stored[r["row"]] == r["item_id"]


def test_batched_pipeline_equals_embed_file(tmp_path, encoder):
    files = make_tree(tmp_path / "root", speakers=3, per_speaker=3, seconds=1.6)
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "root"])
    summary = st.extract(device="cpu", workers=1)
    assert summary.done == 9 and summary.failed == 0 and summary.mean_batch_items > 1
    ids, vectors = st.embeddings()
    assert vectors.shape == (9, encoder.dim) and vectors.dtype == np.float32
    by_uid = {os.path.splitext(str(f.relative_to(tmp_path / "root")))[0]: f for f in files}
    reference = np.stack([encoder.embed_file(str(by_uid[i])) for i in ids])
    assert cosine_rows(vectors, reference).min() >= 0.99999
    check_consistent(st)
    # per speaker
    ids1, v1 = st.embeddings(speaker="spk1")
    assert len(ids1) == 3 and all(i.startswith("ds/spk1/") for i in ids1)
    # a second run has nothing to do, and says so quickly
    started = time.monotonic()
    again = st.extract(device="cpu")
    assert again.nothing_to_do and time.monotonic() - started < 2
    run = st.manifest.query("SELECT * FROM runs")[0]
    assert run["status"] == "finished" and run["items_done"] == 9


@pytest.mark.slow
def test_bad_files_fail_alone_with_reasons_then_retry(tmp_path):
    make_tree(tmp_path / "root", speakers=1, per_speaker=2, seconds=1.0)
    folder = tmp_path / "root" / "ds" / "spk0"
    write(folder / "nan.wav", 1.0, subtype="FLOAT")
    import soundfile as sf

    data, rate = sf.read(folder / "nan.wav", dtype="float32")
    data[100:200] = np.nan
    sf.write(folder / "nan.wav", data, rate, subtype="FLOAT")
    good = write(folder / "vanishes.wav", 1.0, seed=5)
    trunc = write(folder / "truncated.wav", 2.0, seed=6)
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "root"])
    good.unlink()  # deleted between scan and extract
    with open(trunc, "r+b") as f:  # header says 2 s, the data stops after 44 bytes
        f.truncate(44)
    summary = st.extract(device="cpu")
    assert summary.done == 2 and summary.failed == 3
    errors = {Path(e.path).name: e for e in st.errors().failures}
    assert "non-finite" in errors["nan.wav"].error
    assert errors["vanishes.wav"].stage == "read" and "not found" in errors["vanishes.wav"].error
    assert errors["truncated.wav"].stage == "decode"
    reasons = st.status().models["campplus-zh-en-common"]["failures_by_reason"]
    assert sum(reasons.values()) == 3
    # the file comes back: --retry-failed embeds it
    write(good, 1.0, seed=5)
    again = st.extract(device="cpu", retry_failed=True)
    assert again.done == 1 and again.failed == 2
    result = CliRunner().invoke(cli, ["errors", str(tmp_path / "s"), "--json"])
    rows = json.loads(result.output)
    assert {Path(r["path"]).name for r in rows} == {"nan.wav", "truncated.wav"}
    assert all({"id", "path", "stage", "error"} <= set(r) for r in rows)
    # nothing to do: this run failed nothing; the model's failures are the outcome's
    third = st.extract(device="cpu")
    assert third.nothing_to_do and third.failed == 0 and third.outcome.failed == 2, third
    result = CliRunner().invoke(cli, ["extract", str(tmp_path / "s"), "--device", "cpu"])
    assert "has every item it can embed (2 failed;" in result.output and result.exit_code == 3, result.output


@pytest.mark.slow
def test_dedup_and_stale_reextraction(tmp_path):
    files = make_tree(tmp_path / "root", speakers=2, per_speaker=2, seconds=1.2)
    copy = tmp_path / "root" / "ds" / "spk9" / "copy.wav"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(files[0].read_bytes())
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "root"])
    st.extract(device="cpu")
    ids, vectors = st.embeddings()
    vec = dict(zip(ids, vectors))
    assert np.array_equal(vec["ds/spk9/copy"], vec["ds/spk0/spk0-0"])
    # a later duplicate reuses the stored row instead of computing
    copy2 = tmp_path / "root" / "ds" / "spk9" / "copy2.wav"
    copy2.write_bytes(files[1].read_bytes())
    st.scan([tmp_path / "root"])
    rows_before = st.models()[0].rows
    summary = st.extract(device="cpu")
    assert summary.done == 1
    assert st.models()[0].rows == rows_before  # no new row: it points at the twin's
    # a changed file is re-extracted
    write(files[2], 1.9, seed=42)
    os.utime(files[2], ns=(time.time_ns(), time.time_ns() + 10**9))
    st.scan([tmp_path / "root"])
    assert st.status().models["campplus-zh-en-common"]["stale"] == 1
    summary = st.extract(device="cpu")
    assert summary.done == 1
    ids2, vectors2 = st.embeddings()
    vec2 = dict(zip(ids2, vectors2))
    uid = "ds/spk1/spk1-0"
    assert cosine_rows(vec2[uid][None], vec[uid][None])[0] < 0.9999
    # removed files drop out of queries
    files[3].unlink()
    st.scan([tmp_path / "root"])
    assert "ds/spk1/spk1-1" not in st.embeddings()[0]


def _extract_cmd(store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "embstore", "extract", str(store), "--device", "cpu", "--json", *extra]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _claimed_count(store: Path) -> int:
    return _done_count(store, "claimed")


def _done_count(store: Path, status: str = "done") -> int:
    import sqlite3

    try:
        conn = sqlite3.connect(str(store / "manifest.db"), timeout=30)
        n = conn.execute("SELECT count(*) FROM tasks WHERE status = ?", (status,)).fetchone()[0]
        conn.close()
        return n
    except sqlite3.OperationalError:
        return 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_tree(root, speakers=4, per_speaker=5, seconds=1.6)
    clean = root.parent / "clean-store"
    st = embstore.open(clean)
    st.scan([root])
    st.extract(device="cpu", workers=1)
    ids, vectors = st.embeddings()
    return root, dict(zip(ids, vectors))


@pytest.mark.slow
def test_two_workers_one_killed_then_restart(tmp_path, corpus):
    root, clean = corpus
    store = tmp_path / "s"
    st = embstore.open(store)
    st.scan([root])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_extract_cmd(store, "--workers", "2", "--batch-frames", "800"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while _done_count(store) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    workers = [p for p in _children(proc.pid)]
    assert proc.poll() is None, proc.communicate()
    # the spawn context's resource tracker is a child too; kill a real worker (it holds claims)
    owners = [r[0] for r in st.manifest.query("SELECT DISTINCT owner FROM tasks WHERE status = 'claimed'")]
    pids = {int(o.split(":")[1]) for o in owners if o}
    victim = next((p for p in workers if p in pids), None)
    if victim is not None:
        os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    # the survivor finishes the run, including what the victim held
    restarted = subprocess.run(_extract_cmd(store, "--workers", "2"), env=env, capture_output=True, text=True,
                               timeout=180)
    assert restarted.returncode == 0, restarted.stderr
    st2 = embstore.open(store)
    check_consistent(st2)
    ids, vectors = st2.embeddings()
    assert set(ids) == set(clean)
    assert cosine_rows(vectors, np.stack([clean[i] for i in ids])).min() >= 0.99999


@pytest.mark.slow
@pytest.mark.exhaustive  # tests/test_resume.py kills whole runs 20 times
def test_whole_run_killed_then_resumed(tmp_path, corpus):
    root, clean = corpus
    store = tmp_path / "s"
    embstore.open(store).scan([root])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # each claim computes 1 s longer in the killed runs: a kill within 1 s of the first
    # claim lands mid-run on any CPU (a fast one finished the corpus before it)
    slow = dict(env, EMBSTORE_FAULT_SLOW_COMPUTE="1")
    kills_mid_run = 0
    rng = np.random.default_rng(0)
    for _ in range(2):
        proc = subprocess.Popen(_extract_cmd(store, "--workers", "2", "--batch-frames", "400"), env=slow,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while _claimed_count(store) == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 1.0))
        if proc.poll() is None and _done_count(store) < len(clean):
            kills_mid_run += 1
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of everything: parent, workers, writer
        except ProcessLookupError:
            pass
        proc.wait()
    assert kills_mid_run == 2
    resumed = subprocess.run(_extract_cmd(store, "--workers", "2"), env=env, capture_output=True, text=True,
                             timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    st = embstore.open(store)
    check_consistent(st)
    ids, vectors = st.embeddings()
    assert set(ids) == set(clean)
    assert cosine_rows(vectors, np.stack([clean[i] for i in ids])).min() >= 0.99999


@pytest.mark.slow
@pytest.mark.exhaustive  # test_resume.py covers a second run beside a live one
def test_two_extract_commands_at_once(tmp_path, corpus):
    root, clean = corpus
    store = tmp_path / "s"
    embstore.open(store).scan([root])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(_extract_cmd(store), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    # the last to finish reports success; one that ran dry while the other still held
    # claims says so (exit 5) instead of claiming a finished job or stealing live claims
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 5]), outs
    for p, (_, err) in zip(procs, outs):
        if p.returncode == 5:
            assert "held by another run still running" in err, err
    done = [json.loads(o[0])["done"] for o in outs]
    assert sum(done) == len(clean)
    st = embstore.open(store)
    check_consistent(st)
    ids, vectors = st.embeddings()
    assert cosine_rows(vectors, np.stack([clean[i] for i in ids])).min() >= 0.99999


@pytest.mark.slow
def test_sigint_stops_cleanly_and_releases_claims(tmp_path, corpus):
    root, _ = corpus
    store = tmp_path / "s"
    embstore.open(store).scan([root])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_extract_cmd(store, "--batch-frames", "800"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while _done_count(store) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    st = embstore.open(store)
    assert st.manifest.query("SELECT count(*) FROM tasks WHERE status = 'claimed'")[0][0] == 0
    assert st.manifest.query("SELECT status FROM runs")[0][0] == "interrupted"
    check_consistent_partial(st)


def check_consistent_partial(st):
    rows = [r for r in done_tasks(st) if r["status"] == "done"]
    model = st.models()[0]
    assert len({r["row"] for r in rows}) == len(rows)
    assert all(r["row"] < model.rows for r in rows)
