"""Near-duplicate items: pairs of items whose embeddings are near-identical (cosine at or
above a threshold, e.g. 0.98): re-encoded or trimmed copies that the byte hash misses.

Through the index: every row is a range query of the index with `DUP_NPROBE` (2) lists
probed, in batches, asking for rows above `min_score - RANGE_MARGIN` by the SQ8 codes;
the candidate pairs are re-scored exactly from the normalised rows. A near-identical row
sits in one of the two lists nearest its copy, so each query reads ~2 lists: time grows
about linearly with the rows (each list holds ~sqrt(rows) codes). Rows committed after
the index was built are first added to it (a writable store: extended without retraining,
as a query does); rows still past it (a read-only store, or another process holding the
index) are queried against it, and against each other through a temporary index over them
with the published index's lists: never pair by pair. Without an index (up to
`FLAT_ROWS` rows) every pair is scored.

Items sharing one row (byte-identical files, deduplicated at extraction) are not
reported: the byte hash already found them. Removed and stale items never are: rows map
to live items through the manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from embstore.api import Report
from embstore.arrays.unit_cache import UnitRows, unit_rows
from embstore.errors import StoreError
from embstore.manifest import reads
from embstore.manifest.database import Manifest
from embstore.manifest.registry import ModelRecord
from embstore.manifest.tasks import committed_rows
from embstore.search import index as ann
from embstore.search import knn

FLAT_ROWS = 20_000
TILE = 4_096
DUP_NPROBE = 2
QUERY_BLOCK = 16_384
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
    found = _index_over(store, m, source, ann.open_index(store, m))
    name = "flat" if found is None else found[0].kind
    left: list[np.ndarray] = []
    right: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    if found is None:
        parts = _pairs_within(source, np.arange(committed, dtype=np.int64), min_score)
    else:
        parts = _pairs_through_index(found, source, min_score)
    total = 0
    for a, b, s in parts:
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


def _index_over(store: Manifest, m: ModelRecord, source: UnitRows, found: tuple | None) -> tuple | None:
    """The index to search: built first past FLAT_ROWS rows when there is none; extended
    first with the rows committed since when it lags and the store is writable (without
    retraining, as a query does; at once "busy" when another process is at it). A
    read-only store searches what is published."""
    indexed = found[0].rows if found is not None else 0
    if indexed >= source.rows or (found is None and source.rows <= FLAT_ROWS):
        return found
    if found is None:
        ann.ensure(store, m, kind="ivf")
        return ann.open_index(store, m)
    if source.matrix is None:
        return found
    try:
        ann.ensure(store, m, kind="ivf", wait=False, retrain=False)
    except OSError:
        return found  # a full disk: the rows past the index go through a temporary one
    return ann.open_index(store, m) or found


def _pairs_through_index(found: tuple, source: UnitRows, min_score: float) -> Iterator[tuple[np.ndarray, ...]]:
    """(row a, row b, exact score) with a < b, each pair once: every row a range query of
    the index (DUP_NPROBE lists); the rows past the index, which their own queries cannot
    find, also queried against a temporary index over them alone."""
    meta, index = found
    seen: set[tuple[int, int]] = set()
    yield from _range_pairs(index, source, 0, min_score, seen)
    if meta.rows < source.rows:
        yield from _range_pairs(_tail_index(index, source, meta.rows), source, meta.rows, min_score, seen)


def _range_pairs(
    index: Any, source: UnitRows, start: int, min_score: float, seen: set[tuple[int, int]]
) -> Iterator[tuple[np.ndarray, ...]]:
    """(row a, row b, exact score) pairs a < b not in `seen` (then added to it): rows
    [start, source.rows) range-searched in `index`, candidates re-scored exactly."""
    params = ann.search_params(index, DUP_NPROBE)
    for lo, block in knn.blocks_from(source, start, QUERY_BLOCK):
        hi = lo + len(block)
        lims, _, ids = index.range_search(np.ascontiguousarray(block, dtype=np.float32),
                                          float(min_score) - knn.RANGE_MARGIN, params=params)
        q = np.repeat(np.arange(lo, hi, dtype=np.int64), np.diff(lims.astype(np.int64)))
        a, b = np.minimum(q, ids), np.maximum(q, ids)
        keep = (a < b) & (b < source.rows)  # an index extended meanwhile may hold later rows
        a, b = a[keep], b[keep]
        if len(a):
            # a pair is found by both its rows' queries, often in the same block: once
            a, b = np.unique(np.stack([a, b], axis=1), axis=0).T
            s = np.einsum("ij,ij->i", source.take(a), source.take(b))
            hit = s >= min_score
            fresh = [k for k, pair in enumerate(zip(a[hit].tolist(), b[hit].tolist())) if pair not in seen]
            seen.update(zip(a[hit][fresh].tolist(), b[hit][fresh].tolist()))
            yield a[hit][fresh], b[hit][fresh], s[hit][fresh]


def _tail_index(index: Any, source: UnitRows, start: int) -> Any:
    """An index of rows [start, source.rows) alone, in memory, sharing the published
    index's lists (its quantizer) and SQ8 codebook: nothing to train, dim bytes a row,
    and each row compared only with the rows of the lists it probes."""
    import faiss

    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    tail = faiss.IndexIVFScalarQuantizer(ivf.quantizer, ivf.d, ivf.nlist, ivf.sq.qtype, ivf.metric_type,
                                         ivf.by_residual)
    tail.sq = ivf.sq
    tail.is_trained = True
    tail.referenced_objects = [index]  # its quantizer belongs to `index`: kept alive as long (FAISS's way)
    for lo, block in knn.blocks_from(source, start):
        tail.add_with_ids(np.ascontiguousarray(block, dtype=np.float32), np.arange(lo, lo + len(block), dtype=np.int64))
    return tail


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
