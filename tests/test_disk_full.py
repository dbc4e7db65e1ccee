"""A full disk under `extract`: a clean stop (exit 4, one line), a consistent store, and a
resume that does the rest exactly once when space is back.

Two ways to fill the disk: the writer's fault hook (`EMBSTORE_FAULT_ENOSPC_AFTER_ROWS`,
everywhere), and real full tmpfs filesystems (as root, where mounting is permitted;
skipped otherwise): one under the Zarr arrays only, one under the whole store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import embstore
from embstore.verify import verify_store
from tests.audio_factory import make_tree

# subprocesses, kills and full filesystems: `make test` runs these, `make test-fast` does not
pytestmark = pytest.mark.slow

ITEMS = 6


def extract_cli(store: Path, *extra: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "embstore", "extract", str(store), "--device", "cpu", "--workers", "1", *extra],
        env=env, capture_output=True, text=True, timeout=300,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def assert_clean_stop(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 4, (proc.returncode, proc.stdout, proc.stderr)
    lines = error_lines(proc.stderr)
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, lines  # one line, whatever failed
    assert all(w in lines[0] for w in words), lines[0]


def state(store: Path) -> dict[str, int]:
    with embstore.open(store) as st:
        out = {s: n for s, n in st.manifest.query("SELECT status, count(*) FROM tasks GROUP BY status")}
        out["ok"] = verify_store(st.manifest).ok
    return out


def assert_done_once(store: Path) -> None:
    with embstore.open(store) as st:
        report = verify_store(st.manifest)
        assert report.ok, report.as_dict()
        rows = st.manifest.query("SELECT item_id, row, status FROM tasks")
        assert len(rows) == ITEMS and all(r["status"] == "done" for r in rows)
        assert len({r["row"] for r in rows}) == ITEMS  # nothing computed twice
        assert st.models()[0].rows == ITEMS


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "root"
    make_tree(root, speakers=2, per_speaker=3, seconds=1.0)
    return root


def scanned(store: Path, root: Path) -> Path:
    st = embstore.open(store)
    st.scan([root])
    st.close()
    return store


def test_extract_help_documents_exit_4():
    from click.testing import CliRunner

    from embstore.cli import cli

    out = CliRunner().invoke(cli, ["extract", "--help"]).output
    assert "4 stopped on an error of the machine (disk full" in " ".join(out.split())


def test_injected_enospc_stops_cleanly_then_resumes(tmp_path, corpus):
    store = scanned(tmp_path / "s", corpus)
    proc = extract_cli(store, "--batch-frames", "2", env_extra={"EMBSTORE_FAULT_ENOSPC_AFTER_ROWS": "2"})
    assert_clean_stop(proc, "error: disk full", "No space left on device", "run again")
    after = state(store)
    assert after["ok"] and after.get("claimed", 0) == 0 and after.get("done", 0) <= 2
    with embstore.open(store) as st:
        assert st.manifest.query("SELECT status FROM runs")[0][0] == "crashed"
    # space is back: the rest is done, nothing twice
    summary = embstore.open(store).extract(device="cpu", workers=1)
    assert summary.error is None and summary.done == ITEMS - after.get("done", 0)
    assert_done_once(store)


def _mount_tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"embstore-test-{uuid.uuid4().hex[:6]}",
                           str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {proc.stderr.strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.exhaustive
def test_real_full_filesystem_under_the_arrays(tmp_path, corpus):
    store = scanned(tmp_path / "s", corpus)
    zarr_dir = store / "embeddings.zarr"
    # 24 KiB: the metadata and a chunk of a few rows fit, a rewrite of a bigger chunk does not
    _mount_tmpfs(zarr_dir, "24k")
    try:
        proc = extract_cli(store, "--batch-frames", "2")
        assert_clean_stop(proc, "error: disk full", "No space left on device")
        after = state(store)
        assert after["ok"] and after.get("claimed", 0) == 0 and after.get("done", 0) < ITEMS
        # space is back (the filesystem grows, keeping what it holds): resume
        subprocess.run(["mount", "-o", "remount,size=4m", str(zarr_dir)], check=True)
        summary = embstore.open(store).extract(device="cpu", workers=1)
        assert summary.error is None and summary.done == ITEMS - after.get("done", 0)
        assert_done_once(store)
    finally:
        _umount(zarr_dir)


def test_whole_store_on_a_full_filesystem_fails_in_one_line(tmp_path, corpus):
    mount = tmp_path / "mnt"
    _mount_tmpfs(mount, "2m")
    try:
        store = scanned(mount / "s", corpus)
        ballast = mount / "ballast"
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError:
            pass
        try:
            while True:
                os.write(fd, b"\0" * 512)
        except OSError:
            pass
        os.close(fd)
        proc = extract_cli(store)
        assert_clean_stop(proc, "Error:", "disk")
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        scan = subprocess.run([sys.executable, "-m", "embstore", "scan", str(store), str(corpus)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert scan.returncode == 4 and "Traceback" not in scan.stderr and "disk" in scan.stderr
        ballast.unlink()
        after = state(store)  # nothing was damaged
        assert after["ok"] and after.get("claimed", 0) == 0
    finally:
        _umount(mount)
