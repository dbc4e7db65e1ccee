"""Process memory for benchmarks: /proc/self/status fields and a sampling peak tracker."""

from __future__ import annotations

import threading
import time


def status_mb(field: str = "VmRSS") -> float:
    """One /proc/self/status field (VmRSS, RssAnon, VmHWM...) in MiB; 0 where absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


class Peak:
    """Highest value of a status field seen by a thread sampling every 20 ms since `reset`."""

    def __init__(self, field: str = "VmRSS") -> None:
        self.field = field
        self.value = status_mb(field)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.value = max(self.value, status_mb(self.field))
            time.sleep(0.02)

    def reset(self) -> float:
        start = status_mb(self.field)
        self.value = start
        return start

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return out
    for child in children:
        out += [child] + _descendants(child)
    return out


def tree_peak_mb(proc, interval: float = 0.05) -> float:
    """Wait for `proc` (a Popen) while polling VmHWM (each process's own peak RSS) of it
    and all its descendants; returns the largest seen, in MiB. getrusage(RUSAGE_CHILDREN)
    would fold in every earlier child of this process too."""
    peak = 0.0
    while proc.poll() is None:
        for pid in [proc.pid] + _descendants(proc.pid):
            try:
                with open(f"/proc/{pid}/status") as f:
                    hwm = next((line for line in f if line.startswith("VmHWM:")), None)
            except OSError:
                continue
            if hwm is not None:
                peak = max(peak, int(hwm.split()[1]) / 1024)
        time.sleep(interval)
    return peak
