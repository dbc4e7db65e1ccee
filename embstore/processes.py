"""Whether a process of this host still runs: the identity a claim or a run records.

`os.kill(pid, 0)` is not enough to tell. It succeeds for a zombie (a process killed
with -9 stays one until its parent, or PID 1, reaps it: in containers whose PID 1
never reaps, for ever), and for an unrelated process that was given the same PID
later. So an identity here is the PID plus the process's start mark: its start time
in clock ticks since boot (`/proc/<pid>/stat`, field 22) and the boot id. A process
runs when `/proc/<pid>/stat` exists, its state is not zombie or dead, and its start
mark is the recorded one. The kernel sets all three; nothing depends on timing or on
PID 1.

Where `/proc` is absent (macOS, BSD), the start mark is None and the answer falls
back to `kill(pid, 0)`: a zombie or a reused PID then counts as running until the
claim's lease ends.
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


def _stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in ticks) of a process from /proc; None when it has none."""
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
    """`<start ticks>.<boot id>` of a running process; None without /proc or when it does not run."""
    if not has_proc():
        return None
    stat = _stat(pid)
    if stat is None or stat[0] in "ZXx":
        return None
    return f"{stat[1]}.{_boot_id()}"


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
    if has_proc():
        stat = _stat(pid)
        if stat is None or stat[0] in "ZXx":  # gone, a zombie, or dead
            return False
        return mark is None or mark == f"{stat[1]}.{_boot_id()}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    return True


def adopt_environment(env: dict[str, str]) -> None:
    """Take `env` as this process's environment: a child forked from a fork server that
    started earlier sees the environment its parent has now, not the server's."""
    if env == dict(os.environ):
        return
    for name in set(os.environ) - set(env):
        del os.environ[name]
    os.environ.update(env)


__all__ = ["HOST", "has_proc", "start_mark", "own_start_mark", "is_running", "adopt_environment"]
