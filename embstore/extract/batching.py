"""Grouping loaded items into batches the encoder embeds exactly.

    any     items of any lengths together, up to the frame budget
    masked  sorted by length, padded to the batch's longest, the encoder masks the rest;
            a batch costs (items x longest) frames, which must fit the budget, and its
            padding stays under MAX_PADDING of its real frames (padding is compute spent
            on nothing, however large the budget a GPU allows)
    equal   buckets of one feature length only (optionally trimming up to K frames off
            longer items, when the user asked for it); no padding at all
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from embstore.extract.messages import ClaimedTask

MAX_PADDING = 0.15


@dataclass
class Loaded:
    """A claimed item after loading: its features (or waveform, for device features),
    its content hash, a dedup row, or why it failed."""

    task: ClaimedTask
    feats: Any = None  # NumPy [T, ...], or a device tensor once device features ran
    content_hash: str | None = None
    dup_row: tuple[int, int | None] | None = None  # (row, row count) of identical audio done before
    error: tuple[str, str] | None = None  # (stage, message)
    wav: np.ndarray | None = None  # kept only when features are computed on the device (or windowed later)
    plan: Any = None  # a window model's WindowPlan; feats is then one entry per window
    # a window model's window vectors [windows, dim], filled block by block (not row numbers)
    window_vectors: np.ndarray | None = None
    speech: tuple[str, list[tuple[float, float]]] | None = None  # (VAD key, regions) the VAD found here


def plan_batches(items: list[Loaded], batching: str, batch_frames: int, max_trim: int = 0) -> tuple[list[list[Loaded]], int, int]:
    """Group loaded items into batches the encoder embeds exactly.

    Returns (batches, real frames, padded frames); padded - real is the padding
    overhead of masked batching (zero for the other modes).
    """
    if batching == "any":
        return _any_batches(items, batch_frames)
    ordered = sorted(items, key=lambda x: x.feats.shape[0])
    if batching == "masked":
        return _masked_batches(ordered, batch_frames)
    return _equal_batches(ordered, batch_frames, max_trim)


def _any_batches(items: list[Loaded], batch_frames: int) -> tuple[list[list[Loaded]], int, int]:
    batches: list[list[Loaded]] = []
    batch: list[Loaded] = []
    size = real = 0
    for x in items:
        f = x.feats
        # fixed windows [n, frames, bins]: a window's frames count, not one row
        n = int(f.shape[0] * (f.shape[1] if f.ndim == 3 else 1))
        if batch and size + n > batch_frames:
            batches.append(batch)
            batch, size = [], 0
        batch.append(x)
        size += n
        real += n
    if batch:
        batches.append(batch)
    return batches, real, real


def _masked_batches(ordered: list[Loaded], batch_frames: int) -> tuple[list[list[Loaded]], int, int]:
    batches: list[list[Loaded]] = []
    batch: list[Loaded] = []
    real = 0
    for x in ordered:
        n = x.feats.shape[0]
        # sorted ascending: this item is the batch's longest, so the batch costs (len+1) * n
        cost = (len(batch) + 1) * n
        if batch and (cost > batch_frames or cost > (1 + MAX_PADDING) * (real + n)):
            batches.append(batch)
            batch, real = [], 0
        batch.append(x)
        real += n
    if batch:
        batches.append(batch)
    real = sum(x.feats.shape[0] for b in batches for x in b)
    padded = sum(len(b) * b[-1].feats.shape[0] for b in batches)
    return batches, real, padded


def _equal_batches(ordered: list[Loaded], batch_frames: int, max_trim: int) -> tuple[list[list[Loaded]], int, int]:
    groups: list[list[Loaded]] = []
    for x in ordered:
        if groups and x.feats.shape[0] - groups[-1][0].feats.shape[0] <= max_trim:
            groups[-1].append(x)
        else:
            groups.append([x])
    batches: list[list[Loaded]] = []
    real = 0
    for group in groups:
        n = group[0].feats.shape[0]
        if max_trim:
            for x in group:
                x.feats = x.feats[:n]
        per_batch = max(1, batch_frames // max(n, 1))
        for start in range(0, len(group), per_batch):
            batches.append(group[start : start + per_batch])
        real += n * len(group)
    return batches, real, real


def default_batch_frames(device: str, batching: str, workers_per_device: int = 1) -> int:
    """Feature frames per batch: on CUDA from the device's free memory (shared by the
    workers on it); on CPU what pays there."""
    if device.startswith("cuda"):
        try:
            import torch

            free, _ = torch.cuda.mem_get_info(int(device.split(":")[1]) if ":" in device else 0)
            # ~64 KB of activations per frame for ResNet34-sized models at fp32, with headroom;
            # an out-of-memory halves it at run time anyway
            return int(max(20_000, min(2_000_000, free * 0.5 / 65536 / max(1, workers_per_device))))
        except Exception:
            return 200_000
    # on CPU large batches do not pay (ResNet34: batch 8 is slower per item than batch 1),
    # and padding costs real compute: masked batches only pack short items together
    return {"any": 16_000, "masked": 1_000}.get(batching, 6_000)
