"""Near-duplicate items: pairs of items whose embeddings are near-identical (cosine at or
above a threshold, e.g. 0.98): re-encoded or trimmed copies that the byte hash misses.

Through the index's partition: two near-identical rows almost always sit in the same IVF
list (the nearest centroid of one is the nearest of the other), so each list's rows are
compared with each other exactly, from the normalised rows: about rows x list size x dim
multiply-adds in all, linear in the rows for a given list size (the lists grow as
sqrt(rows)). Rows committed after the index was built are put in their nearest list
first. A store too small for an index (up to `FLAT_ROWS`) is one list. A pair whose rows
fell into different lists is missed: benchmarks/search_scale.py measures how often.

Items sharing one row (byte-identical files, deduplicated at extraction) are not
reported: the byte hash already found them. Removed and stale items never are: rows map
to live items through the manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from embstore.api import Report
from embstore.arrays.unit_cache import UnitRows, unit_rows
from embstore.errors import StoreError
from embstore.manifest import reads
from embstore.manifest.database import Manifest
from embstore.manifest.tasks import committed_rows
from embstore.search import index as ann

FLAT_ROWS = 20_000
TILE = 4_096
PAIR_CAP = 1_000_000


@dataclass
class DuplicatePair:
    """Two items (`a` < `b` by id) with near-identical embeddings: `score` their cosine."""

    a: str
    b: str
    score: float
    speaker_a: str | None
    speaker_b: str | None
    dataset_a: str
    dataset_b: str


@dataclass
class DuplicatesReport(Report):
    """Near-duplicate item pairs (`Store.near_duplicates`), best first, at most `limit`
    (`total`: how many were found); `index`: the partition used ("flat": all rows compared)."""

    model: str
    min_score: float
    index: str
    rows: int
    total: int
    seconds: float
    pairs: list[DuplicatePair] = field(default_factory=list)


def near_duplicates(
    store: Manifest, min_score: float = 0.98, model: str | None = None, limit: int = 1000
) -> DuplicatesReport:
    """Pairs of live items whose rows score at least `min_score`, best first."""
    if not 0.0 < min_score <= 1.0:
        raise StoreError(f"min_score must be in (0, 1] (got {min_score})")
    if limit < 1:
        raise StoreError(f"limit must be at least 1 (got {limit})")
    started = time.perf_counter()
    m = store.resolve_model(model)
    committed = committed_rows(store.conn, m.id)
    source = unit_rows(store.model_arrays(m), committed, m.fingerprint, store.paths.cache)
    found = ann.open_index(store, m)
    if found is None and committed > FLAT_ROWS:
        ann.ensure(store, m, kind="ivf")
        found = ann.open_index(store, m)
    name = "flat" if found is None else found[0].kind
    groups = _lists(found, source) if found is not None else iter([np.arange(committed, dtype=np.int64)])
    left: list[np.ndarray] = []
    right: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    total = 0
    for rows in groups:
        for a, b, s in _pairs_within(source, rows, min_score):
            left.append(a)
            right.append(b)
            scores.append(s)
            total += len(a)
        if total > PAIR_CAP:
            raise StoreError(f"more than {PAIR_CAP} row pairs at or above {min_score}; raise the minimum score")
    pairs = _to_items(store, m.id, _cat(left), _cat(right), _cat(scores, np.float32))
    return DuplicatesReport(store.model_key(m), min_score, name, committed, len(pairs),
                            round(time.perf_counter() - started, 3), pairs[:limit])


def _cat(parts: list[np.ndarray], dtype: type = np.int64) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _lists(found: tuple, source: UnitRows) -> Iterator[np.ndarray]:
    """The rows of each IVF list (sorted), the rows past the index in their nearest list."""
    import faiss

    meta, index = found
    ivf = faiss.extract_index_ivf(index)
    extra: dict[int, list[np.ndarray]] = {}
    for lo in range(meta.rows, source.rows, 65_536):
        hi = min(lo + 65_536, source.rows)
        _, nearest = ivf.quantizer.search(np.ascontiguousarray(source.matrix[lo:hi]), 1)
        for lst in np.unique(nearest[:, 0]):
            extra.setdefault(int(lst), []).append(lo + np.flatnonzero(nearest[:, 0] == lst))
    invlists = ivf.invlists
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy() if size else np.zeros(0, np.int64)
        rows = np.concatenate([ids, *extra.get(lst, [])])
        if len(rows) > 1:
            yield np.sort(rows[rows < source.rows])


def _pairs_within(source: UnitRows, rows: np.ndarray, min_score: float) -> Iterator[tuple[np.ndarray, ...]]:
    """(row a, row b, score) arrays of the pairs a < b of `rows` at or above min_score,
    tile by tile over the upper triangle."""
    for lo in range(0, len(rows), TILE):
        left = source.take(rows[lo : lo + TILE])
        for hi in range(lo, len(rows), TILE):
            right = left if hi == lo else source.take(rows[hi : hi + TILE])
            s = left @ right.T
            i, j = np.nonzero(s >= min_score)
            keep = (lo + i) < (hi + j)
            if keep.any():
                i, j = i[keep], j[keep]
                yield rows[lo + i], rows[hi + j], s[i, j]


def _to_items(store: Manifest, model_id: int, a: np.ndarray, b: np.ndarray, s: np.ndarray) -> list[DuplicatePair]:
    """Row pairs as pairs of live items (every item of one row with every item of the
    other), best first; rows of no live item drop out."""
    if not len(a):
        return []
    owners: dict[int, list] = {}
    for r in reads.items_at_rows(store.conn, model_id, np.unique(np.concatenate([a, b])).tolist()):
        owners.setdefault(int(r["row"]), []).append(r)
    out = []
    for ra, rb, score in zip(a.tolist(), b.tolist(), s.tolist()):
        for x in owners.get(ra, ()):
            for y in owners.get(rb, ()):
                first, second = (x, y) if x["id"] < y["id"] else (y, x)
                out.append(DuplicatePair(first["uid"], second["uid"], round(score, 6), first["speaker"],
                                         second["speaker"], first["dataset"], second["dataset"]))
    out.sort(key=lambda p: (-p.score, p.a, p.b))
    return out
