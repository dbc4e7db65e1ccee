"""Fault injection for tests: a file that kills its worker, as a decoder's segfault or
the OOM killer would. A leaf: no embstore imports.

    EMBSTORE_FAULT_CRASH_PATHS=poison   a worker that starts decoding a file whose path
                                        contains "poison" dies at once (SIGKILL)
    EMBSTORE_FAULT_SLOW_COMPUTE=3       each claim's compute takes 3 s longer, as a long
                                        item on a slow device would

Like EMBSTORE_FAULT_ENOSPC_AFTER_ROWS (the writer's full disk), it is read in the
process that does the work, so tests set it for the workers' environment.
"""

from __future__ import annotations

import os
import signal
import time

CRASH_PATHS = "EMBSTORE_FAULT_CRASH_PATHS"
SLOW_COMPUTE = "EMBSTORE_FAULT_SLOW_COMPUTE"


def crash_if_poison(path: str) -> None:
    marker = os.environ.get(CRASH_PATHS)
    if marker and marker in path:
        os.kill(os.getpid(), signal.SIGKILL)


def slow_compute() -> None:
    seconds = float(os.environ.get(SLOW_COMPUTE) or 0)
    if seconds > 0:
        time.sleep(seconds)
