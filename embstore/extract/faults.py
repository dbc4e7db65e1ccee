"""Fault injection for tests: a file that kills its worker, as a decoder's segfault or
the OOM killer would; an embedding step that raises. Imports nothing of embstore but
its exceptions (`embstore.errors`) and the out-of-memory hook, which lives with the
halving it tests (`embstore.segments.oom`: `WindowEmbedder` below extract meets it too).

    EMBSTORE_FAULT_CRASH_PATHS=poison   a worker that starts decoding a file whose path
                                        contains "poison" dies at once (SIGKILL)
    EMBSTORE_FAULT_SLOW_COMPUTE=3       each claim's compute takes 3 s longer, as a long
                                        item on a slow device would
    EMBSTORE_FAULT_HOLD_COMPUTE=PATH    each claim's compute waits until PATH exists (120 s at
                                        most), as a busy device would: a test lets it go
                                        when it has seen what happens meanwhile
    EMBSTORE_FAULT_EMBED_PATHS=bad      an embedding step (one forward of a block of items,
                                        or of windows) holding an item, or a window of an
                                        item, whose path contains "bad" raises, as a model
                                        that chokes on one input would
    EMBSTORE_FAULT_OOM_ABOVE=4          an embedding step of more than 4 units (items, or
                                        windows of a window model) raises an error the
                                        worker takes for out of memory, as a device would

Like EMBSTORE_FAULT_ENOSPC_AFTER_ROWS (the writer's full disk), they are read in the
process that does the work, so tests set them for the workers' environment.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Iterable

from embstore.errors import InjectedFault
from embstore.segments.oom import OOM_ABOVE, oom_fault

CRASH_PATHS = "EMBSTORE_FAULT_CRASH_PATHS"
SLOW_COMPUTE = "EMBSTORE_FAULT_SLOW_COMPUTE"
HOLD_COMPUTE = "EMBSTORE_FAULT_HOLD_COMPUTE"
HOLD_LIMIT_SECONDS = 120.0
EMBED_PATHS = "EMBSTORE_FAULT_EMBED_PATHS"


def crash_if_poison(path: str) -> None:
    marker = os.environ.get(CRASH_PATHS)
    if marker and marker in path:
        os.kill(os.getpid(), signal.SIGKILL)


def slow_compute() -> None:
    seconds = float(os.environ.get(SLOW_COMPUTE) or 0)
    if seconds > 0:
        time.sleep(seconds)
    release = os.environ.get(HOLD_COMPUTE)
    if release:
        deadline = time.monotonic() + HOLD_LIMIT_SECONDS
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)


def embed_step(paths: Iterable[str], units: int) -> None:
    """Called inside each embedding step with the paths of its units (one per unit) and
    their number: raises as EMBSTORE_FAULT_OOM_ABOVE and EMBSTORE_FAULT_EMBED_PATHS say."""
    oom_fault(units)
    marker = os.environ.get(EMBED_PATHS)
    if marker and any(marker in path for path in paths):
        raise InjectedFault(f"injected embedding fault ({EMBED_PATHS}={marker})")


# OOM_ABOVE is named here with the other hooks, for the tests that set them
__all__ = ["CRASH_PATHS", "SLOW_COMPUTE", "HOLD_COMPUTE", "EMBED_PATHS", "OOM_ABOVE", "crash_if_poison", "slow_compute", "embed_step"]
