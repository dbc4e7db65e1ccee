"""`embstore cluster`: pseudo-speaker labels for the whole items of a dataset, in the store.

The done items of the dataset's live items (one model) are clustered by
`embstore.clustering.corpus.cluster_corpus` (average-linkage AHC; above `MAX_DIRECT`
distinct rows, the streamed cells -> local AHC -> merging path, whose memory does not
grow with the corpus' [n, dim] matrix). Deduplicated items share one row, so one vector
is clustered per distinct row and every item on it gets that row's label. Labels go to
`items.cluster` as `c0001`, `c0002`... (largest cluster first), in one transaction that
also clears the dataset's earlier labels; items without an embedding, or whose row is
not a usable vector, are left without a label.
"""

from __future__ import annotations

import difflib
import time
from typing import Any, Callable

import numpy as np

from embstore.clustering.corpus import cluster_corpus
from embstore.models.thresholds import thresholds_for
from embstore.clustering.labels import purity_coverage
from embstore.errors import ClusteringError
from embstore.manifest import clusters as cluster_sql
from embstore.manifest import reports
from embstore.manifest.database import Manifest
from embstore.manifest.registry import ModelRecord
from embstore.manifest.selection import Selection
from embstore.query import UnitRows, unit_rows

# distinct rows gathered into one in-memory matrix (256 MB at dim 256); above it the
# clustering reads the rows block by block through `_RowView`
IN_MEMORY_ROWS = 262144

Progress = Callable[[str, int, int], None]


class _RowView:
    """Rows `rows` (sorted) of a model's normalised rows, as the [n, dim] matrix
    `cluster_corpus` reads: slices for its streamed passes, sorted index arrays for its
    gathers. Nothing is held but the row numbers."""

    def __init__(self, source: UnitRows, rows: np.ndarray):
        self.source = source
        self.rows = rows
        self.shape = (len(rows), source.dim)

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.source.take(self.rows[key])


def whole_item_model(store: Manifest, model: str | None) -> ModelRecord:
    """The model to cluster: the one named, or the store's only whole-item model."""
    if model is None:
        items = [m for m in store.models() if not m.windowed]
        if len(items) == 1:
            return items[0]
        if not items and store.models():
            raise ClusteringError(
                "the store holds window embeddings only; corpus clustering needs a whole-item model"
                " (`embstore extract` without --windows)"
            )
    m = store.resolve_model(model)
    if m.windowed:
        raise ClusteringError(
            f"model {store.model_key(m)} holds window embeddings; corpus clustering needs a whole-item model"
        )
    return m


def _matrix(store: Manifest, m: ModelRecord, rows: np.ndarray) -> Any:
    """The distinct rows (sorted) as the clustering's input, without loading more than needed."""
    source = unit_rows(store, m)
    if len(rows) and rows[-1] >= source.rows:
        raise ClusteringError("the manifest points past the committed embeddings; run `embstore extract` to repair")
    if source.matrix is not None and len(rows) == source.rows:
        return source.matrix  # the dataset is every row of the model: the memory-mapped cache itself
    if len(rows) <= IN_MEMORY_ROWS:
        return source.take(rows)
    return _RowView(source, rows)


def _names(labels: np.ndarray, count: int) -> list[str]:
    """`c0001`... per cluster, numbered from the largest (ties: first appearance)."""
    sizes = np.bincount(labels[labels >= 0], minlength=count)
    first = np.full(count, len(labels), dtype=np.int64)
    valid = np.flatnonzero(labels >= 0)
    np.minimum.at(first, labels[valid], valid)
    order = np.lexsort((first, -sizes))
    width = max(4, len(str(count)))
    names = [""] * count
    for rank, c in enumerate(order):
        names[c] = f"c{rank + 1:0{width}d}"
    return names


def cluster_dataset(
    store: Manifest, dataset: str, model: str | None = None, threshold: float | None = None,
    num_speakers: int | None = None, progress: Progress | None = None,
) -> dict[str, Any]:
    """Cluster the dataset's embedded items and store their labels; returns the report:
    dataset, model, items (live), embedded, rows (distinct vectors), clustered,
    unlabelled, clusters, algorithm ("ahc": AHC on the items; "cells": the staged path),
    threshold, num_speakers, seconds, purity/coverage against the speaker labels when
    the dataset has more than one (the clustering never reads them), and `outcome`
    (an `embstore.outcome.Outcome`: items left unlabelled because they failed or are
    not extracted yet)."""
    started = time.perf_counter()
    if threshold is not None and num_speakers is not None:
        raise ClusteringError("give --threshold or --num-speakers, not both")
    m = whole_item_model(store, model)
    total = cluster_sql.dataset_items(store.conn, dataset)
    if total == 0:
        names = cluster_sql.dataset_names(store.conn)
        close = difflib.get_close_matches(dataset, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else f" (it has: {', '.join(names[:10]) or 'none'})"
        raise ClusteringError(f"no dataset {dataset!r} in the store{hint}")
    done = cluster_sql.dataset_done_rows(store.conn, m.id, dataset)
    key = store.model_key(m)
    if not len(done.item_ids):
        raise ClusteringError(f"dataset {dataset!r} has no items embedded with {key} yet; run `embstore extract`")
    # one vector per distinct row: deduplicated items share a row and so a label
    rows, row_of_item = np.unique(done.rows, return_inverse=True)
    if num_speakers is not None and num_speakers > len(rows):
        raise ClusteringError(
            f"--num-speakers {num_speakers} is more than the {len(rows)} distinct embedded items of {dataset!r}"
        )
    default = thresholds_for(m.name).corpus_cluster
    result = cluster_corpus(_matrix(store, m, rows), threshold=threshold, num_speakers=num_speakers, progress=progress,
                            default_threshold=default)
    item_labels = result.labels[row_of_item]
    names = _names(result.labels, result.num_clusters)
    labelled = np.flatnonzero(item_labels >= 0)

    def pairs():
        for k in labelled:
            yield names[item_labels[k]], int(done.item_ids[k])

    def written(n: int) -> None:
        if progress is not None:
            progress("labels", n, len(labelled))

    with store.write() as conn:
        cluster_sql.write_cluster_labels(conn, dataset, pairs(), written)
    report: dict[str, Any] = {
        "dataset": dataset, "model": key, "items": total, "embedded": int(len(done.item_ids)), "rows": int(len(rows)),
        "clustered": int(len(labelled)), "unlabelled": int(total - len(labelled)), "clusters": result.num_clusters,
        "algorithm": "cells" if result.cells else "ahc",
        "threshold": threshold if threshold is not None else (default if num_speakers is None else None),
        "num_speakers": num_speakers,
    }
    if result.cells:
        report.update(cells=result.cells, local_clusters=result.local_clusters, passes=result.passes)
        if num_speakers is not None:
            report["threshold"] = default  # the local clusters' cut before merging down
    if len(done.speakers) > 1:
        # a dataset with real speaker labels: how well the clusters match them
        purity, coverage = purity_coverage(item_labels, done.speaker)
        report.update(speakers=len(done.speakers), purity=round(purity, 4), coverage=round(coverage, 4))
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["stage_seconds"] = {k: round(v, 3) for k, v in result.timings.items()}
    # the dataset's items not embedded (failed, or not extracted yet) have no label
    report["outcome"] = reports.coverage(store.conn, m.id, Selection(dataset=dataset), key)
    return report


def clear_dataset(store: Manifest, dataset: str) -> int:
    """Remove the dataset's cluster labels; returns how many items had one."""
    with store.write() as conn:
        return cluster_sql.clear_cluster_labels(conn, dataset)


__all__ = ["cluster_dataset", "clear_dataset", "whole_item_model", "IN_MEMORY_ROWS"]
