"""Progress bars (one factory, shown only on a terminal) and rates. A leaf: no embstore imports."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(enabled: bool, **options: Any) -> Any:
    """A tqdm bar on stderr when `enabled` and stderr is a terminal, else None.

    tqdm is imported only when a bar is shown; callers treat None as "no bar"."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    options.setdefault("file", sys.stderr)
    options.setdefault("dynamic_ncols", True)
    return tqdm(**options)


def rate(count: float, seconds: float) -> float:
    """count per second; 0 for no time at all."""
    return count / seconds if seconds else 0.0
