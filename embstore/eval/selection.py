"""SEL: which of a store's items feed the mean vector or the cohort of score normalisation.

A SEL is one of
  - `dataset:NAME`      every live item of that dataset,
  - `speakers:FILE`     every live item of the speakers listed in FILE (one per line),
  - `FILE`              the items listed in FILE, one id per line (an item id or its
                        unique ending, as in trial lists).
Only items with a finished embedding of the model count; the others are left out with
a warning, so a cohort with a few failed items still works.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from embstore.errors import StoreError
from embstore.manifest import reads
from embstore.manifest.database import Manifest
from embstore.manifest.registry import ModelRecord
from embstore.query import resolve_ids

SEL_HELP = "a file of item ids, dataset:NAME or speakers:FILE"


@dataclass
class ItemSelection:
    """The selected items with a done embedding: their Zarr rows and speakers."""

    label: str
    rows: np.ndarray  # int64, one per item (items sharing audio share a row)
    speakers: list[str]
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def speaker_index(self) -> tuple[list[str], np.ndarray]:
        """(distinct speakers sorted, the index of each item's speaker among them)."""
        names, index = np.unique(np.array(self.speakers, dtype=object).astype(str), return_inverse=True)
        return [str(n) for n in names], index.astype(np.int64)


def _read_lines(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file (a selection is {SEL_HELP})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: cannot read the {what} ({getattr(exc, 'strerror', None) or exc})") from None
    # one entry per line; the first field, so `utt2spk`-like files with a second column work
    values = [line.split()[0] for line in lines if line and not line.startswith("#")]
    if not values:
        raise StoreError(f"{path}: no {what} in the file")
    return list(dict.fromkeys(values))


def resolve_selection(store: Manifest, model: ModelRecord, sel: str, what: str = "selection") -> ItemSelection:
    """The items SEL names that have an embedding of `model`; an error when none does."""
    sel = str(sel)
    warnings: list[str] = []
    if sel.startswith("dataset:"):
        name = sel[len("dataset:") :]
        rows = reads.items_with_task(store.conn, model.id, "dataset", [name])
        if not rows:
            have = [r[0] for r in store.query("SELECT DISTINCT dataset FROM items WHERE removed = 0 LIMIT 20")]
            raise StoreError(f"{what} {sel}: no dataset {name!r} in the store (it has: {', '.join(map(str, have))})")
    elif sel.startswith("speakers:"):
        path = sel[len("speakers:") :]
        names = _read_lines(path, "speakers")
        rows = reads.items_with_task(store.conn, model.id, "speaker", names)
        found = {r["speaker"] for r in rows}
        unknown = [n for n in names if n not in found]
        if unknown:
            warnings.append(
                f"{what} {sel}: {len(unknown)} of {len(names)} speakers are not in the store ({_first(unknown)})"
            )
    else:
        if not os.path.exists(sel):
            raise StoreError(f"{what} {sel!r}: no such file (a selection is {SEL_HELP})")
        ids = _read_lines(sel, "item ids")
        found_ids = resolve_ids(store, ids)
        unknown = [i for i in ids if found_ids[i] is None]
        if unknown:
            warnings.append(f"{what} {sel}: {len(unknown)} of {len(ids)} ids are not in the store ({_first(unknown)})")
        known = sorted({v for v in found_ids.values() if v is not None})
        rows = reads.items_with_task(store.conn, model.id, "id", known)
    done = [r for r in rows if r["done"]]
    if len(done) < len(rows):
        warnings.append(f"{what} {sel}: {len(rows) - len(done)} of {len(rows)} items have no embedding yet; left out")
    if not done:
        raise StoreError(f"{what} {sel} is empty: none of its items has an embedding of this model")
    done.sort(key=lambda r: r["id"])
    speakers = [r["speaker"] if r["speaker"] is not None else "" for r in done]
    return ItemSelection(sel, np.array([r["row"] for r in done], dtype=np.int64), speakers, warnings)


def _first(values: list[str], n: int = 5) -> str:
    return ", ".join(values[:n]) + (", ..." if len(values) > n else "")


__all__ = ["ItemSelection", "resolve_selection", "SEL_HELP"]
