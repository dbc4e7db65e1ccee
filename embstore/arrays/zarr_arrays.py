"""Embedding rows in Zarr: one group per model inside `STORE/embeddings.zarr`.

Each model group holds `vectors` (float32 [rows, dim]) and `item_ids` (int64 [rows],
the `items.id` each row was computed for); a window model's group also holds `spans`
(float32 [rows, 2]: each window's start and end, seconds from its item's start). The manifest's `models.rows` is the number
of committed rows; anything past it is left over from a crash and gets overwritten.
Chunks are large along rows (CHUNK_ROWS) so appends rewrite few chunk files and a
speaker's rows, written together, sit in one or two chunks.
"""

from __future__ import annotations

import os

import numpy as np

CHUNK_ROWS = 4096
ID_CHUNK_ROWS = 65536
GROW_ROWS = 65536


def _zarr():
    import zarr

    return zarr


class ModelArrays:
    """The Zarr arrays of one model. Only the writer appends; anyone may read."""

    def __init__(self, zarr_path: str | os.PathLike, group_name: str, dim: int, spans: bool = False):
        self.zarr_path = str(zarr_path)
        self.group_name = group_name
        self.dim = int(dim)
        self.spans = spans

    def _group(self, create: bool):
        zarr = _zarr()
        mode = "a" if create else "r"
        root = zarr.open_group(self.zarr_path, mode=mode, zarr_format=3)
        if self.group_name in root:
            group = root[self.group_name]
        elif not create:
            return None
        else:
            group = root.create_group(self.group_name)
        if not create:
            return group
        # checked one by one: a crash while creating can leave the group without an array
        if "vectors" not in group:
            group.create_array(
                "vectors", shape=(0, self.dim), chunks=(CHUNK_ROWS, self.dim), dtype="float32", fill_value=np.nan
            )
        if "item_ids" not in group:
            group.create_array("item_ids", shape=(0,), chunks=(ID_CHUNK_ROWS,), dtype="int64", fill_value=-1)
        if self.spans and "spans" not in group:
            group.create_array("spans", shape=(0, 2), chunks=(ID_CHUNK_ROWS, 2), dtype="float32", fill_value=np.nan)
        return group

    def arrays(self):
        """(vectors, item_ids) opened fresh, so a shape another writer grew is seen."""
        group = self._group(create=False)
        if group is None or "vectors" not in group or "item_ids" not in group:
            return None, None
        return group["vectors"], group["item_ids"]

    def write_rows(self, start: int, vectors: np.ndarray, item_ids: np.ndarray, spans: np.ndarray | None = None) -> None:
        """Write rows [start, start + n), growing the arrays in large steps when needed."""
        n = len(vectors)
        if n == 0:
            return
        if self.spans and (spans is None or len(spans) != n):
            raise ValueError("a window model's rows need their spans")
        group = self._group(create=True)
        end = start + n
        new_rows = ((end + GROW_ROWS - 1) // GROW_ROWS) * GROW_ROWS
        columns = [(group["vectors"], np.asarray(vectors, dtype=np.float32)),
                   (group["item_ids"], np.asarray(item_ids, dtype=np.int64))]
        if self.spans:
            columns.append((group["spans"], np.asarray(spans, dtype=np.float32)))
        # each array on its own: a crash between two resizes leaves them unequal
        for array, values in columns:
            if array.shape[0] < end:
                array.resize((new_rows, *array.shape[1:]))
        for array, values in columns:
            array[start:end] = values

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of the given rows, in the given order, reading only the chunks they touch."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vec, _ = self.arrays()
        if vec is None:
            raise FileNotFoundError(f"no embeddings array {self.group_name} in {self.zarr_path}")
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        # read each contiguous run of chunks as one slice: few large reads beat a gather
        chunk_of = sorted_rows // CHUNK_ROWS
        breaks = np.flatnonzero(np.diff(chunk_of) > 1) + 1
        for part in np.split(np.arange(len(sorted_rows)), breaks):
            lo = int(sorted_rows[part[0]])
            hi = int(sorted_rows[part[-1]]) + 1
            block = vec[lo:hi]
            out[order[part]] = block[sorted_rows[part] - lo]
        return out

    def read_spans(self, start: int, stop: int) -> np.ndarray:
        """[stop - start, 2] window spans of rows [start, stop) (a window model's)."""
        group = self._group(create=False)
        if group is None or "spans" not in group:
            raise FileNotFoundError(f"no spans array in {self.group_name} of {self.zarr_path}")
        return np.asarray(group["spans"][start:stop], dtype=np.float32)

    def iter_blocks(self, rows: int, block_rows: int = CHUNK_ROWS * 16):
        """(start, vectors, item_ids) over the first `rows` rows, block by block."""
        vec, ids = self.arrays()
        if vec is None:
            return
        for start in range(0, rows, block_rows):
            stop = min(start + block_rows, rows)
            yield start, vec[start:stop], ids[start:stop]
