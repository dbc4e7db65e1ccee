"""The same voices in two datasets: speakers of A whose centroid (or, by items, any of
whose items) lies within a cosine of a speaker of B. The train/test leakage check.

Exact and without the index: a speaker's centroid is the mean of its items' normalised
rows, made unit again; A's centroids (or A's items, block by block) are multiplied with
B's centroids. Two datasets of 1 M items and 10,000 speakers each: two passes over their
rows for the centroids, then a 10,000 x 10,000 product (benchmarks/search_scale.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from embstore.api import Report
from embstore.arrays.unit_cache import UnitRows, unit_rows
from embstore.errors import StoreError
from embstore.manifest.database import Manifest
from embstore.manifest.registry import ModelRecord
from embstore.manifest.selection import Selection, select_items
from embstore.manifest.tasks import committed_rows
from embstore.vectors import l2_normalise

BLOCK_ROWS = 65_536
BLOCK_SPEAKERS = 4_096
PAIR_CAP = 100_000


@dataclass
class SharedSpeaker:
    """A speaker of A (`speaker`, its `items`) within the threshold of a speaker of B
    (`other`, its `other_items`) with `score`: the centroids' cosine, or by items the best
    cosine of one of A's items (`item`, how many of A's items were above: `matches`) to
    B's centroid."""

    speaker: str
    other: str
    score: float
    items: int
    other_items: int
    item: str | None = None
    matches: int | None = None


@dataclass
class OverlapReport(Report):
    """Speakers of dataset `source` found in dataset `target` (`Store.overlap`), best first:
    `pairs`; `by` "centroid" or "items"; `speakers`/`target_speakers` compared."""

    model: str
    source: str
    target: str
    threshold: float
    by: str
    speakers: int
    target_speakers: int
    seconds: float
    pairs: list[SharedSpeaker] = field(default_factory=list)


def overlap(
    store: Manifest, source: str, target: str, threshold: float = 0.7, model: str | None = None, items: bool = False
) -> OverlapReport:
    """Speakers of dataset `source` within cosine `threshold` of a speaker of `target`."""
    if not -1.0 <= threshold <= 1.0:
        raise StoreError(f"threshold is a cosine in [-1, 1] (got {threshold})")
    if source == target:
        # every speaker would match itself: no leakage check, only a self-comparison
        raise StoreError(f"overlap compares two datasets: {source!r} is both the source and the target")
    started = time.perf_counter()
    m = store.resolve_model(model)
    rows = unit_rows(store.model_arrays(m), committed_rows(store.conn, m.id), m.fingerprint, store.paths.cache)
    a_names, a_index, a_rows, a_uids = _speaker_rows(store, m, source)
    b_names, b_index, b_rows, _ = _speaker_rows(store, m, target)
    b_sums, b_counts = _sums(rows, b_index, b_rows, len(b_names))
    b_unit = l2_normalise(b_sums)
    a_counts = np.bincount(a_index, minlength=len(a_names))
    if items:
        pairs = _by_items(rows, a_index, a_rows, a_uids, b_unit, threshold)
    else:
        a_sums, _ = _sums(rows, a_index, a_rows, len(a_names))
        pairs = _by_centroid(l2_normalise(a_sums), b_unit, threshold)
    found = [
        SharedSpeaker(a_names[a], b_names[b], round(float(s), 6), int(a_counts[a]), int(b_counts[b]),
                      item, None if matches is None else int(matches))
        for a, b, s, item, matches in pairs
    ]
    found.sort(key=lambda p: (-p.score, p.speaker, p.other))
    return OverlapReport(store.model_key(m), source, target, threshold, "items" if items else "centroid",
                         len(a_names), len(b_names), round(time.perf_counter() - started, 3), found)


def _speaker_rows(store: Manifest, m: ModelRecord, dataset: str) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(speakers sorted, speaker index per done live item, its row, its id) of a dataset."""
    found = select_items(store.conn, m.id, Selection(dataset=dataset))
    if not found:
        raise StoreError(f"no embedded items in dataset {dataset!r} for {store.model_key(m)}")
    speakers = [r["speaker"] or "" for r in found]
    names, index = np.unique(np.array(speakers, dtype=object), return_inverse=True)
    rows = np.fromiter((r["row"] for r in found), dtype=np.int64, count=len(found))
    return [str(n) for n in names], index.astype(np.int64), rows, [r["uid"] for r in found]


def _sums(source: UnitRows, index: np.ndarray, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-speaker sums of the normalised rows, items per speaker), reading rows in order."""
    from scipy.sparse import csr_matrix

    sums = np.zeros((n, source.dim), dtype=np.float64)
    order = np.argsort(rows, kind="stable")
    for lo in range(0, len(order), BLOCK_ROWS):
        part = order[lo : lo + BLOCK_ROWS]
        vectors = source.take(rows[part])
        present, local = np.unique(index[part], return_inverse=True)
        onehot = csr_matrix((np.ones(len(part), np.float32), (local, np.arange(len(part)))), shape=(len(present), len(part)))
        sums[present] += onehot @ vectors
    return sums.astype(np.float32), np.bincount(index, minlength=n)


def _by_centroid(a_unit: np.ndarray, b_unit: np.ndarray, threshold: float) -> list[tuple]:
    pairs: list[tuple] = []
    for lo in range(0, len(a_unit), BLOCK_SPEAKERS):
        scores = a_unit[lo : lo + BLOCK_SPEAKERS] @ b_unit.T
        for a, b in zip(*np.nonzero(scores >= threshold)):
            pairs.append((lo + int(a), int(b), scores[a, b], None, None))
        if len(pairs) > PAIR_CAP:
            raise StoreError(f"more than {PAIR_CAP} speaker pairs at or above {threshold}; raise the threshold")
    return pairs


def _by_items(
    source: UnitRows, a_index: np.ndarray, a_rows: np.ndarray, a_uids: list[str], b_unit: np.ndarray, threshold: float
) -> list[tuple]:
    """(A speaker, B speaker, best item score, that item, items above) for every pair with
    an item of A at or above the threshold against B's centroid."""
    best: dict[tuple[int, int], list] = {}
    order = np.argsort(a_rows, kind="stable")
    for lo in range(0, len(order), BLOCK_ROWS):
        part = order[lo : lo + BLOCK_ROWS]
        scores = source.take(a_rows[part]) @ b_unit.T
        for i, b in zip(*np.nonzero(scores >= threshold)):
            k = int(part[i])
            key = (int(a_index[k]), int(b))
            entry = best.setdefault(key, [-2.0, None, 0])
            entry[2] += 1
            if scores[i, b] > entry[0]:
                entry[0], entry[1] = float(scores[i, b]), a_uids[k]
        if len(best) > PAIR_CAP:
            raise StoreError(f"more than {PAIR_CAP} speaker pairs at or above {threshold}; raise the threshold")
    return [(a, b, s, item, n) for (a, b), (s, item, n) in best.items()]
