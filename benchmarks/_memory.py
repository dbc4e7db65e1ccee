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
