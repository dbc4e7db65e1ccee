"""Whether a claim's owner still runs: a zombie is dead, a PID given to another process
is dead, a running owner is alive (`embstore.processes`, `manifest.tasks.owner_is_dead`).

The zombie and the reused PID both looked alive to the old `kill(pid, 0)` test, which
left a killed run's claims held: the next `extract` then did nothing and exited 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import embstore
from embstore import processes
from embstore.manifest import runs, tasks
from tests.store_factory import fake_model_description, make_tree

pytestmark = pytest.mark.skipif(not processes.has_proc(), reason="start marks need /proc (Linux)")


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    return text[text.rindex(")") + 2]


@pytest.fixture
def zombie():
    """(pid, start mark taken while it ran) of a child that has exited and is not reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    mark = processes.start_mark(proc.pid)
    assert mark is not None and processes.is_running(proc.pid, mark)
    proc.stdin.close()  # it exits; nobody waits for it yet, so it stays a zombie
    deadline = time.monotonic() + 30
    while _state(proc.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _state(proc.pid) == "Z"
    yield proc.pid, mark
    proc.wait()


def test_a_zombie_owner_is_dead(zombie):
    pid, mark = zombie
    assert os.kill(pid, 0) is None  # what the old test asked: the zombie answers
    assert not processes.is_running(pid, mark) and not processes.is_running(pid)
    assert tasks.owner_is_dead(tasks.process_owner(pid, mark) + "abcd1234")
    # owners written by older versions (host:pid:token) and runs (host:pid) too
    assert tasks.owner_is_dead(f"{processes.HOST}:{pid}:abcd1234")
    assert tasks.owner_is_dead(f"{processes.HOST}:{pid}")


def test_an_owner_whose_pid_was_given_to_another_process_is_dead():
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE) as other:
        # the same PID as the owner had, a different start: another process
        mark = processes.start_mark(other.pid)
        ticks, boot, namespace = mark.split(".")
        earlier = f"{int(ticks) - 100}.{boot}.{namespace}"
        assert tasks.owner_is_dead(tasks.process_owner(other.pid, earlier) + "abcd1234")
        assert not tasks.owner_is_dead(tasks.process_owner(other.pid, mark) + "abcd1234")
        # after a reboot, the same PID and start ticks are another process too
        assert tasks.owner_is_dead(tasks.process_owner(other.pid, f"{ticks}.ffffffff.{namespace}") + "abcd1234")
        other.stdin.close()


def test_running_owners_and_other_hosts_are_alive():
    me = tasks.new_owner()
    host, pid, mark, token = me.split(":")
    assert (host, int(pid), mark) == (processes.HOST, os.getpid(), processes.own_start_mark())
    assert not tasks.owner_is_dead(me)
    assert not tasks.owner_is_dead(f"{processes.HOST}:{os.getpid()}:abcd1234")  # old form, live process
    assert not tasks.owner_is_dead(f"another-host:{os.getpid() + 1}:x:abcd1234")  # only its lease can tell
    assert tasks.owner_is_dead(f"{processes.HOST}:999999999:x:abcd1234")  # no such process


def test_claims_and_runs_of_a_zombie_are_freed_at_once(zombie, tmp_path):
    """A killed run's workers are zombies until reaped: its claims go back to pending and
    its run is marked crashed by the next run's start, before any lease runs out."""
    pid, mark = zombie
    make_tree(tmp_path / "corpus", speakers=2, per_speaker=3)
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "corpus"])
    model_id = st.manifest.register_model(fake_model_description()).id
    tasks.refresh_tasks(st.manifest.conn, model_id, lambda n: n // 160, 16000)
    dead = tasks.process_owner(pid, mark) + "abcd1234"
    live = tasks.new_owner()
    assert len(tasks.claim_batch(st.manifest.conn, model_id, dead, 3600, 4, 10**9)) == 4
    assert len(tasks.claim_batch(st.manifest.conn, model_id, live, 3600, 1, 10**9)) == 1
    with st.manifest.write() as conn:
        run_id = conn.execute(
            "INSERT INTO runs (model_id, host, pid, pid_start, options, started_at, status)"
            " VALUES (?, ?, ?, ?, '{}', '2026-01-01', 'running')", (model_id, processes.HOST, pid, mark),
        ).lastrowid
    counts = tasks.refresh_tasks(st.manifest.conn, model_id, lambda n: n // 160, 16000)
    assert counts["released"] == 4  # the zombie's claims, not the live owner's one
    assert tasks.claimable_count(st.manifest.conn, model_id) == 5
    runs.start_run(st.manifest.conn, model_id, {})
    assert st.manifest.query("SELECT status FROM runs WHERE id = ?", (run_id,))[0][0] == "crashed"
    # a cluster actor's claims die with its driver's run, zombie or not
    actor = tasks.ray_owner("node", "actor", run_id)
    assert tasks.ray_run_is_gone(st.manifest.conn, actor)
    st.close()


def test_a_process_hidden_from_proc_is_alive(monkeypatch):
    """/proc mounted with hidepid: another user's process has no readable stat file. It
    still runs (kill(pid, 0) says so), so its claims are not taken."""
    me = os.getpid()
    real_open = open

    def hidden(path, *args, **kwargs):
        if str(path) == f"/proc/{me}/stat":
            raise PermissionError(13, "Permission denied", path)  # hidepid=1
        return real_open(path, *args, **kwargs)

    namespace = processes.own_start_mark().split(".")[2]
    monkeypatch.setattr("builtins.open", hidden)
    assert processes.is_running(me, f"1.deadbeef.{namespace}")
    monkeypatch.setattr(processes, "_stat", lambda pid: None)  # hidepid=2: no /proc/<pid> at all
    assert processes.is_running(me, f"1.deadbeef.{namespace}")  # kill(pid, 0) finds it
    assert not processes.is_running(999999999, f"1.deadbeef.{namespace}")


def test_an_owner_of_another_pid_namespace_is_left_to_its_lease():
    """Two containers with one hostname but their own PIDs: an owner whose start mark names
    another PID namespace cannot be judged here, so it counts as running."""
    ticks, boot, namespace = processes.own_start_mark().split(".")
    other = f"{ticks}.{boot}.{int(namespace) + 1}"
    assert processes.is_running(999999999, other)
    assert not tasks.owner_is_dead(tasks.process_owner(999999999, other) + "abcd1234")
    assert tasks.owner_is_dead(tasks.process_owner(999999999, processes.own_start_mark()) + "abcd1234")
