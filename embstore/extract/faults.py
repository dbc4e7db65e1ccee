"""Fault injection for tests: a file that kills its worker, as a decoder's segfault or
the OOM killer would. A leaf: no embstore imports.

    EMBSTORE_FAULT_CRASH_PATHS=poison   a worker that starts decoding a file whose path
                                        contains "poison" dies at once (SIGKILL)

Like EMBSTORE_FAULT_ENOSPC_AFTER_ROWS (the writer's full disk), it is read in the
process that does the work, so tests set it for the workers' environment.
"""

from __future__ import annotations

import os
import signal

CRASH_PATHS = "EMBSTORE_FAULT_CRASH_PATHS"


def crash_if_poison(path: str) -> None:
    marker = os.environ.get(CRASH_PATHS)
    if marker and marker in path:
        os.kill(os.getpid(), signal.SIGKILL)
