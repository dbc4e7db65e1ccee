"""`items.cluster`: pseudo-speaker labels from corpus clustering, beside the real speaker.

A label (`c0001`) is unique within its dataset only: the clusterings of two datasets are
unrelated, so readers that need one name per pseudo-speaker across the store use
`CLUSTER_NAME` (`<dataset>/c0001`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from embstore.errors import StoreError
from embstore.manifest.connection import LIVE_ITEM, scalar

# the store-wide name of an item's pseudo-speaker; NULL when the item has no label
CLUSTER_NAME = "coalesce(i.dataset, '') || '/' || i.cluster"
# what queries and exports group items by: the real speaker label or the cluster label
BY = ("speaker", "cluster")

FETCH_ROWS = 65536


@dataclass
class DatasetRows:
    """The done items of one dataset for one model, as arrays (no Row objects: 1 M
    items stay ~30 MB). `speaker` codes index `speakers`."""

    item_ids: np.ndarray  # int64 [n]
    rows: np.ndarray      # int64 [n], the model's array row of each item (shared by deduplicated items)
    speaker: np.ndarray   # int32 [n]
    speakers: list[str]


def check_by(by: str) -> str:
    if by not in BY:
        raise StoreError(f"unknown grouping {by!r}: use speaker or cluster")
    return by


def group_name(by: str) -> str:
    """The SQL expression (over `items i`) naming an item's speaker or pseudo-speaker."""
    return "i.speaker" if check_by(by) == "speaker" else CLUSTER_NAME


def dataset_items(conn: sqlite3.Connection, dataset: str) -> int:
    """Live items of a dataset."""
    return int(scalar(conn, f"SELECT count(*) FROM items i WHERE {LIVE_ITEM} AND i.dataset = ?", (dataset,)))


def dataset_names(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute(f"SELECT DISTINCT i.dataset FROM items i WHERE {LIVE_ITEM} ORDER BY 1")
            if r[0] is not None]


def dataset_done_rows(conn: sqlite3.Connection, model_id: int, dataset: str) -> DatasetRows:
    """Every live item of `dataset` whose task for the model is done, in item order."""
    ids: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    names: dict[str, int] = {}
    cursor = conn.execute(
        "SELECT i.id, t.row, i.speaker FROM tasks t JOIN items i ON i.id = t.item_id"
        f" WHERE t.model_id = ? AND t.status = 'done' AND {LIVE_ITEM} AND i.dataset = ? ORDER BY i.id",
        (model_id, dataset),
    )
    while True:
        batch = cursor.fetchmany(FETCH_ROWS)
        if not batch:
            break
        ids.append(np.fromiter((r[0] for r in batch), dtype=np.int64, count=len(batch)))
        rows.append(np.fromiter((r[1] for r in batch), dtype=np.int64, count=len(batch)))
        codes.append(np.fromiter(
            (names.setdefault(r[2] if r[2] is not None else "", len(names)) for r in batch), dtype=np.int32,
            count=len(batch),
        ))
    if not ids:
        return DatasetRows(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32), [])
    return DatasetRows(np.concatenate(ids), np.concatenate(rows), np.concatenate(codes), list(names))


def write_cluster_labels(
    conn: sqlite3.Connection,
    dataset: str,
    labelled: Iterable[tuple[str, int]],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Replace the dataset's labels: every item of it (removed ones too) loses its old
    label, then each (label, item id) pair is set. Call inside one write transaction, so
    readers see the old labels or the new ones, never a mix. Returns the pairs written."""
    conn.execute("UPDATE items SET cluster = NULL WHERE dataset = ? AND cluster IS NOT NULL", (dataset,))
    written = 0
    batch: list[tuple[str, int]] = []
    for pair in labelled:
        batch.append(pair)
        if len(batch) >= FETCH_ROWS:
            conn.executemany("UPDATE items SET cluster = ? WHERE id = ?", batch)
            written += len(batch)
            batch.clear()
            if progress is not None:
                progress(written)
    if batch:
        conn.executemany("UPDATE items SET cluster = ? WHERE id = ?", batch)
        written += len(batch)
    return written


def clear_cluster_labels(conn: sqlite3.Connection, dataset: str) -> int:
    """Drop the dataset's labels; returns how many items had one."""
    return conn.execute("UPDATE items SET cluster = NULL WHERE dataset = ? AND cluster IS NOT NULL", (dataset,)).rowcount


def cluster_labels(conn: sqlite3.Connection, dataset: str) -> dict[str, str]:
    """{item uid: label} of the dataset's live labelled items (for tests and small reads)."""
    return dict(conn.execute(
        f"SELECT i.uid, i.cluster FROM items i WHERE i.cluster IS NOT NULL AND {LIVE_ITEM} AND i.dataset = ?",
        (dataset,),
    ).fetchall())


def cluster_counts(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """{dataset: {"items": labelled live items, "clusters": distinct labels}}; the
    partial index items_cluster makes this free on a store without labels."""
    return {
        dataset: {"items": n, "clusters": k}
        for dataset, n, k in conn.execute(
            "SELECT i.dataset, count(*), count(DISTINCT i.cluster) FROM items i"
            f" WHERE i.cluster IS NOT NULL AND {LIVE_ITEM} GROUP BY i.dataset ORDER BY i.dataset"
        )
    }


__all__ = [
    "CLUSTER_NAME", "BY", "check_by", "group_name", "DatasetRows", "dataset_items", "dataset_names", "dataset_done_rows", "write_cluster_labels",
    "clear_cluster_labels", "cluster_labels", "cluster_counts",
]
