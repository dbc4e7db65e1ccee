"""Out of memory on a device: how it is recognised, what is freed after one, and a
forward run in halves until it fits.

Shared by the extraction worker (`extract/worker.py`, `ItemEmbedder`) and by
`WindowEmbedder.iter_embed` (`verify --deep`, queries by audio), so an item that
extraction embeds on a small GPU is embedded by them too. It lives here, in the lowest
layer both import, and imports nothing of embstore but its exceptions.

    EMBSTORE_FAULT_OOM_ABOVE=4   an embedding step of more than 4 units (items, or
                                 windows) raises an error taken for out of memory, as a
                                 device would (tests; `extract/faults.py` lists the others)
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence, TypeVar

import numpy as np

from embstore.errors import InjectedFault

OOM_ABOVE = "EMBSTORE_FAULT_OOM_ABOVE"

Unit = TypeVar("Unit")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether a forward failed for want of device memory (torch's OutOfMemoryError, or
    any runtime whose message says so: ONNX Runtime, OpenVINO, an injected fault)."""
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def release_cached_memory() -> None:
    """Hand torch's cached CUDA blocks back after an out-of-memory, so the halves that
    follow find them free. Only when torch is loaded already: an ONNX or OpenVINO
    process has no torch cache, and importing torch would cost it a second."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        torch.cuda.empty_cache()
    except Exception:
        pass  # no CUDA, or a torch build without it: nothing was cached


def oom_fault(units: int) -> None:
    """The test hook, called before each embedding step with its number of units."""
    limit = os.environ.get(OOM_ABOVE)
    if limit and units > int(limit):
        # recognised by `is_out_of_memory` like a device's (torch's own message starts so)
        raise InjectedFault(f"CUDA out of memory (injected: {units} units, more than {limit})")


def embed_halving(
    step: Callable[[Sequence[Unit]], np.ndarray], units: Sequence[Unit],
    on_oom: Callable[[int], None] | None = None,
) -> np.ndarray:
    """`step(units)` ([len(units), dim]), or, when it runs out of memory, the same vectors
    from its halves, halved again down to single units; a single unit that still does
    not fit raises. `on_oom(size)` hears of each failed size (to plan later steps
    smaller). Exact only for steps whose vectors do not depend on their neighbours."""
    try:
        oom_fault(len(units))
        return step(units)
    except Exception as exc:
        if not is_out_of_memory(exc) or len(units) < 2:
            raise
    release_cached_memory()
    if on_oom is not None:
        on_oom(len(units))
    half = len(units) // 2
    return np.concatenate([embed_halving(step, units[:half], on_oom), embed_halving(step, units[half:], on_oom)])


__all__ = ["OOM_ABOVE", "is_out_of_memory", "release_cached_memory", "oom_fault", "embed_halving"]
