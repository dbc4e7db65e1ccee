"""Nearest rows of a query vector: top n, or every row at or above a cosine, through the
model's index when it has one and by the exact scan otherwise.

With an index, candidates come from the IVF lists nearest the query (`nprobe` of them)
and are re-ranked exactly from the normalised rows, and rows committed after the index
was built are scanned exactly: a returned score is always the exact cosine, and a
lagging index never hides new rows. Rows are rows: mapping them to live items (and
leaving out removed and stale ones) is the caller's job, through the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from embstore.arrays.unit_cache import UnitRows
from embstore.errors import StoreError
from embstore.manifest.database import Manifest
from embstore.manifest.registry import ModelRecord
from embstore.search import index as ann

# candidates asked of the index per wanted row, and at least this many: the re-rank
# makes their order exact, so more candidates only buy recall
CANDIDATES_PER_ROW = 4
MIN_CANDIDATES = 256
# SQ8 codes move an inner product by up to ~0.01 at dim 192: a range search asks the index
# for rows above `threshold - RANGE_MARGIN` and keeps those the exact re-rank puts above it
RANGE_MARGIN = 0.05
# range queries probe this many times the lists of a top-k query (recall of the exact set
# at T = 0.7, 10 M rows: 0.93 at 128 lists, 0.97 at 256)
RANGE_NPROBE_FACTOR = 2
# a query with no index builds one from this many rows on; one whose index lags by more
# than AUTO_EXTEND_ROWS rows extends it first (the lag is scanned exactly meanwhile)
AUTO_INDEX_ROWS = 2_000_000
AUTO_EXTEND_ROWS = 100_000
# when the rows wanted reach 1/EXACT_FRACTION of the indexed rows, the scan is as cheap
EXACT_FRACTION = 8
# a range query never gathers more rows than this (an error says to raise the threshold)
RANGE_CAP = 100_000
# a range query's candidates are re-ranked this many at a time, and the re-rank stops
# once more than the cap score above the threshold: a threshold set too low fails after
# reading cap + one block of rows, not every candidate of the probed lists
RERANK_BLOCK = 16_384
# rows per block of the exact scan
SCAN_BLOCK = 65_536


@dataclass
class Searcher:
    """The rows of one model, searched through `index` (a FAISS index over rows
    [0, meta.rows)) or, without one, by the exact scan."""

    source: UnitRows
    meta: ann.IndexMeta | None = None
    index: Any = None
    # what answered the last query: `top` scans exactly when the rows wanted are many
    # for the index, so the index's presence alone does not say
    answered: str | None = field(default=None, init=False)

    @property
    def name(self) -> str:
        """What answered (the last query): "flat" (the exact scan) or the index's kind,
        e.g. "ivf4096,sq8"."""
        if self.answered is not None:
            return self.answered
        return "flat" if self.meta is None else self.meta.kind

    @property
    def exact(self) -> bool:
        """True when every row was scored (no candidate could be missed)."""
        return self.name == "flat"

    def top(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n best (row, exact score), best first (ties by row)."""
        if self.meta is None or n * EXACT_FRACTION >= self.meta.rows:
            self.answered = "flat"
            return exact_top(self.source, query, n)
        self.answered = self.meta.kind
        want = max(CANDIDATES_PER_ROW * n, MIN_CANDIDATES)
        _, ids = self.index.search(query[None, :].astype(np.float32), want)
        rows, scores = self._rerank(ids[0], query)
        tail_rows, tail_scores = exact_top(self.source, query, n, start=self.meta.rows)
        return _best(np.concatenate([rows, tail_rows]), np.concatenate([scores, tail_scores]), n)

    def at_least(self, query: np.ndarray, threshold: float, cap: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every (row, exact score) with score >= threshold, best first; more than `cap`
        (default RANGE_CAP) is an error."""
        cap = RANGE_CAP if cap is None else cap
        self.answered = "flat" if self.meta is None else self.meta.kind
        if self.meta is None:
            rows, scores = exact_at_least(self.source, query, threshold, cap)
        else:
            ids = self._range_candidates(query, float(threshold) - RANGE_MARGIN)
            rows, scores = self._rerank_at_least(ids, query, threshold, cap)
            if len(rows) <= cap:  # else too many already: the tail is not read
                tail_rows, tail_scores = exact_at_least(
                    self.source, query, threshold, cap - len(rows), start=self.meta.rows)
                rows, scores = np.concatenate([rows, tail_rows]), np.concatenate([scores, tail_scores])
        if len(rows) > cap:
            raise StoreError(f"more than {cap} rows score at least {threshold}; raise the minimum score")
        return _best(rows, scores, len(rows))

    def _range_candidates(self, query: np.ndarray, radius: float) -> np.ndarray:
        """Rows the index puts above `radius`, probing RANGE_NPROBE_FACTOR x the lists of a
        top-k query: a range query wants every row above the threshold, not just the best."""
        params = ann.search_params(self.index, self.meta.nprobe * RANGE_NPROBE_FACTOR)
        _, _, ids = self.index.range_search(query[None, :].astype(np.float32), radius, params=params)
        return ids

    def _rerank(self, ids: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = _candidate_rows(ids, self.source.rows)
        if not len(rows):
            return rows, np.zeros(0, np.float32)
        return rows, self.source.take(rows) @ query

    def _rerank_at_least(
        self, ids: np.ndarray, query: np.ndarray, threshold: float, cap: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The candidates scoring >= threshold exactly, re-ranked RERANK_BLOCK rows at a
        time; stops once more than `cap` are found (the caller reports too many)."""
        rows = _candidate_rows(ids, self.source.rows)
        hits: list[np.ndarray] = []
        hit_scores: list[np.ndarray] = []
        found = 0
        for lo in range(0, len(rows), RERANK_BLOCK):
            block = rows[lo : lo + RERANK_BLOCK]
            scores = self.source.take(block) @ query
            keep = scores >= threshold
            hits.append(block[keep])
            hit_scores.append(scores[keep])
            found += int(keep.sum())
            if found > cap:
                break
        if not hits:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(hits), np.concatenate(hit_scores)


def _candidate_rows(ids: np.ndarray, rows: int) -> np.ndarray:
    """The index's candidate ids as rows under `rows`, unique and sorted (the memmap then
    reads forward)."""
    found = np.unique(ids[ids >= 0]).astype(np.int64)
    return found[found < rows]


def searcher(store: Manifest, model: ModelRecord, source: UnitRows, exact: bool = False) -> Searcher:
    """How to search the model's rows: exactly when asked, when the rows stream from Zarr
    (no cache: a read-only store), when FAISS is not installed (the `search` extra) or when
    no index is published; else through the index,
    built first when there is none and the rows reach AUTO_INDEX_ROWS, extended first
    when it lags by more than AUTO_EXTEND_ROWS (both skipped when another process is at it)."""
    if exact or source.matrix is None or not ann.available():
        return Searcher(source)
    found = ann.open_index(store, model)
    lag = source.rows - (found[0].rows if found else 0)
    wanted = (found is None and source.rows >= AUTO_INDEX_ROWS) or (found is not None and lag > AUTO_EXTEND_ROWS)
    if wanted:
        try:
            if ann.ensure(store, model, wait=False, retrain=found is None).action in ("built", "extended"):
                found = ann.open_index(store, model)
        except OSError:
            pass  # a read-only store or a full disk: search with what is published
    if found is None:
        return Searcher(source)
    return Searcher(source, *found)


def exact_top(source: UnitRows, query: np.ndarray, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The n best (row, score) over rows [start, source.rows), best first: top-n per
    block, then merged."""
    best_rows: list[np.ndarray] = []
    best_scores: list[np.ndarray] = []
    for first, block in blocks_from(source, start):
        # einsum's own SIMD loop: as fast as BLAS gemv single-threaded, and unlike it never
        # slowed down (~2x on 2 cores) by BLAS threads fighting over a memory-bound product
        scores = np.einsum("ij,j->i", block, query)
        if len(scores) > n:
            keep = np.argpartition(scores, len(scores) - n)[-n:]
            scores = scores[keep]
            rows = keep + first
        else:
            rows = np.arange(first, first + len(scores))
        best_rows.append(rows)
        best_scores.append(scores)
    if not best_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return _best(np.concatenate(best_rows), np.concatenate(best_scores), n)


def exact_at_least(
    source: UnitRows, query: np.ndarray, threshold: float, cap: int, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Every (row, score) over rows [start, source.rows) with score >= threshold, unordered;
    stops gathering past `cap` + 1 rows (the caller reports too many)."""
    rows: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    total = 0
    for first, block in blocks_from(source, start):
        s = np.einsum("ij,j->i", block, query)
        hit = np.flatnonzero(s >= threshold)
        rows.append(hit + first)
        scores.append(s[hit])
        total += len(hit)
        if total > cap:
            break
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(rows).astype(np.int64), np.concatenate(scores)


def blocks_from(source: UnitRows, start: int, block_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, normalised block) over rows [start, source.rows), `block_rows` rows
    (default SCAN_BLOCK) a block."""
    block_rows = block_rows or SCAN_BLOCK
    if start >= source.rows:
        return
    if source.matrix is not None:
        for first in range(start, source.rows, block_rows):
            yield first, source.matrix[first : first + block_rows]
        return
    for first, block in source.blocks(block_rows):
        if first + len(block) <= start:
            continue
        cut = max(0, start - first)
        yield first + cut, block[cut:]


def _best(rows: np.ndarray, scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n best, best first, ties by row."""
    order = np.lexsort((rows, -scores))[:n]
    return rows[order].astype(np.int64), scores[order]
