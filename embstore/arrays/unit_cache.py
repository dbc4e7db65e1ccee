"""A model's committed rows, L2-normalised, as a rebuildable memory-mapped file.

Nearest neighbours scan every committed row. Reading 1 M rows back from Zarr means
decompressing ~1 GB (seconds), so the first query builds `STORE/cache/<array>/unit.f32`:
the rows L2-normalised, as a flat float32 file that later queries memory-map and scan in
~0.2 s per million rows. Committed rows never change (the writer only appends past the
committed count), so the cache is extended, never rebuilt, as extraction adds rows. It is
derived data: deleting `STORE/cache` is always safe. When the store is read-only the rows
stream from Zarr instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from embstore.arrays.zarr_arrays import ModelArrays
from embstore.errors import StoreError
from embstore.paths import file_lock
from embstore.vectors import l2_normalise

BLOCK_ROWS = 65536


@dataclass
class UnitRows:
    """A model's committed rows, L2-normalised, readable block by block."""

    rows: int
    dim: int
    matrix: np.ndarray | None  # memory-mapped cache; None = stream from Zarr
    arrays: ModelArrays

    def blocks(self, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        if self.matrix is not None:
            for start in range(0, self.rows, block_rows):
                yield start, self.matrix[start : start + block_rows]
            return
        for start, vectors, _ids in self.arrays.iter_blocks(self.rows, block_rows):
            yield start, l2_normalise(vectors)

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if self.matrix is not None:
            return np.asarray(self.matrix[rows], dtype=np.float32).reshape(len(rows), self.dim)
        return l2_normalise(self.arrays.read_rows(rows))


def unit_rows(arrays: ModelArrays, committed: int, fingerprint: str, cache_root: Path, use_cache: bool = True) -> UnitRows:
    """Rows [0, committed) of `arrays` normalised; from `cache_root/<array>/` when it can be kept."""
    matrix = None
    if use_cache and committed:
        try:
            matrix = _cached_matrix(arrays, committed, fingerprint, cache_root / arrays.group_name)
        except OSError:
            matrix = None  # read-only store or full disk: stream instead
    return UnitRows(committed, arrays.dim, matrix, arrays)


def _cached_matrix(arrays: ModelArrays, committed: int, fingerprint: str, folder: Path) -> np.ndarray:
    data_path = str(folder / "unit.f32")
    meta_path = str(folder / "unit.json")
    dim = arrays.dim
    want = {"fingerprint": fingerprint, "dim": dim}
    meta = _read_meta(meta_path)
    if not (meta and _same(meta, want) and meta["rows"] >= committed):
        os.makedirs(folder, exist_ok=True)
        with file_lock(folder / ".lock"):
            meta = _read_meta(meta_path)  # someone else may have extended it meanwhile
            have = meta["rows"] if meta and _same(meta, want) and meta["rows"] <= committed else 0
            if have < committed:
                _extend(data_path, meta_path, want, arrays, have, committed, dim)
            meta = _read_meta(meta_path)
    if meta is None:
        raise OSError("cache metadata missing")
    # a cache ahead of the store (rows rolled back) only serves the committed prefix
    return np.memmap(data_path, dtype=np.float32, mode="r", shape=(committed, dim))


def _same(meta: dict, want: dict) -> bool:
    return meta.get("fingerprint") == want["fingerprint"] and meta.get("dim") == want["dim"]


def _read_meta(path: str) -> dict | None:
    try:
        with open(path) as f:
            meta = json.load(f)
        return meta if isinstance(meta.get("rows"), int) else None
    except (OSError, ValueError, AttributeError):
        return None


def _extend(data_path: str, meta_path: str, want: dict, arrays: ModelArrays, have: int, committed: int, dim: int) -> None:
    vectors, _ = arrays.arrays()
    if vectors is None:
        raise StoreError(f"the store records {committed} rows but its embeddings array is missing")
    with open(data_path, "r+b" if os.path.exists(data_path) else "w+b") as f:
        # anything past the recorded rows is a torn append from an interrupted build
        f.truncate(have * dim * 4)
        f.seek(have * dim * 4)
        for start in range(have, committed, BLOCK_ROWS):
            block = vectors[start : min(start + BLOCK_ROWS, committed)]
            f.write(np.ascontiguousarray(l2_normalise(block)).tobytes())
        f.flush()
        os.fsync(f.fileno())
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(want, rows=committed), f)
    os.replace(tmp, meta_path)
