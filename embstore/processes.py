"""Whether a process of this host still runs: the identity a claim or a run records.

`os.kill(pid, 0)` is not enough to tell. It succeeds for a zombie (a process killed
with -9 stays one until its parent, or PID 1, reaps it: in containers whose PID 1
never reaps, for ever), and for an unrelated process that was given the same PID
later. So an identity here is the PID plus the process's start mark: its start time
in clock ticks since boot (`/proc/<pid>/stat`, field 22), the boot id and the PID
namespace. A process runs when `/proc/<pid>/stat` exists, its state is not zombie or
dead, and its start mark is the recorded one. The kernel sets all of these; nothing
depends on timing or on PID 1.

What cannot be judged here counts as running, and the claim's lease decides: a mark
of another PID namespace (two containers sharing a hostname), a process that /proc
hides (mounted with hidepid) but `kill(pid, 0)` finds. Where `/proc` is absent (macOS,
BSD), the start mark is None and the answer is `kill(pid, 0)`'s: a zombie or a reused
PID then counts as running until the lease ends.
"""

from __future__ import annotations

import functools
import os
import socket

HOST = socket.gethostname()


@functools.lru_cache(maxsize=1)
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:8]
    except OSError:
        return "0"


@functools.lru_cache(maxsize=1)
def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def _stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in ticks) of a process from /proc; None when it has none;
    PermissionError when hidepid=1 lets /proc/<pid> exist but not be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ')': split after the last one
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], fields[19]


def has_proc() -> bool:
    return os.path.exists("/proc/self/stat")


def start_mark(pid: int) -> str | None:
    """`<start ticks>.<boot id>.<PID namespace>` of a running process; None without /proc
    or when it does not run (or cannot be read)."""
    if not has_proc():
        return None
    try:
        stat = _stat(pid)
    except PermissionError:  # hidepid=1: its start cannot be read
        return None
    if stat is None or stat[0] in "ZXx":
        return None
    return f"{stat[1]}.{_boot_id()}.{_pid_namespace()}"


@functools.lru_cache(maxsize=1)
def _own_mark(pid: int) -> str | None:
    return start_mark(pid)


def own_start_mark() -> str | None:
    """This process's start mark (cached per PID: a forked child computes its own)."""
    return _own_mark(os.getpid())


def is_running(pid: int, mark: str | None = None) -> bool:
    """Whether PID of this host runs and, when `mark` is given, is the process that had
    that start mark (not a later one given the same PID)."""
    if pid <= 0:
        return False
    parts = mark.split(".") if mark else []
    if len(parts) > 2 and parts[2] != _pid_namespace():
        return True  # another PID namespace's process: not ours to judge, its lease is
    if not has_proc():
        return _exists(pid)
    try:
        stat = _stat(pid)
    except PermissionError:
        return True  # hidepid=1: it exists, its start cannot be read
    if stat is None:
        # gone, or hidden by hidepid=2 (another user's process): kill(pid, 0) tells them apart
        return _exists(pid)
    if stat[0] in "ZXx":  # a zombie, or dead
        return False
    return not parts or parts[:2] == [stat[1], _boot_id()]


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    return True


def die_with_parent() -> None:
    """Kill this process (SIGKILL) when the process that started it dies: a run's writer
    or worker never outlives the run, holding claims nobody can free before their lease
    ends. The parent is the run's supervisor, not the fork server the child was forked
    from (that one lives on while any of its children do); multiprocessing's parent
    sentinel reads end-of-file when the supervisor is gone."""
    import multiprocessing
    import signal
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    sentinel = getattr(parent, "sentinel", None)
    if sentinel is None:
        return

    def watch() -> None:
        wait([sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def adopt_environment(env: dict[str, str]) -> None:
    """Take `env` as this process's environment: a child forked from a fork server that
    started earlier sees the environment its parent has now, not the server's."""
    if env == dict(os.environ):
        return
    for name in set(os.environ) - set(env):
        del os.environ[name]
    os.environ.update(env)


__all__ = ["HOST", "has_proc", "start_mark", "own_start_mark", "is_running", "die_with_parent", "adopt_environment"]
