"""Writing export files safely: sanitised names, nothing outside OUT (atomic writes:
`embstore.paths.write_atomic`)."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embstore.api import Report
from embstore.arrays.zarr_arrays import ModelArrays
from embstore.errors import StoreError
from embstore.manifest.clusters import check_by
from embstore.manifest.database import Manifest
from embstore.manifest.registry import ModelRecord
from embstore.manifest.reports import coverage
from embstore.manifest.selection import Selection
from embstore.outcome import Outcome

MAX_NAME_BYTES = 200

_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


def safe_component(text: str | None) -> str:
    """One path component that cannot leave its folder, whatever `text` holds."""
    name = _UNSAFE.sub("_", "" if text is None else str(text))
    if name in ("", ".", ".."):
        name = "_" + name
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
        short = name.encode("utf-8", "surrogatepass")[: MAX_NAME_BYTES - 9].decode("utf-8", "ignore")
        name = f"{short}~{digest}"
    return name


def output_folder(out: str | os.PathLike) -> str:
    """OUT made absolute and created; a folder that cannot be made is one line."""
    out_path = os.path.abspath(os.fspath(out))
    try:
        os.makedirs(out_path, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create {out_path}: {exc.strerror or exc}") from None
    return out_path


def inside(out_real: str, rel_dir: str) -> str:
    """The real directory for `rel_dir` below OUT; refuses one that resolves outside it."""
    target = os.path.realpath(os.path.join(out_real, rel_dir))
    if target != out_real and not target.startswith(out_real + os.sep):
        raise StoreError(f"refusing to write into {rel_dir!r}: it resolves to {target}, outside {out_real}")
    return target


@dataclass
class MatrixExport(Report):
    """What `export-kaldi` or `export-npy` wrote to `out`: `items` done items (`windows`
    rows of a window model), the `files` written; `spec` and `dim` (npy), `speakers`
    (kaldi); `left_out`: unclustered items with by="cluster"."""

    out: str
    model: str
    fingerprint: str
    items: int
    files: list[str]
    seconds: float = 0.0
    outcome: Outcome = field(default_factory=Outcome)
    spec: str | None = None
    dim: int | None = None
    speakers: int | None = None
    windows: int | None = None
    by: str = "speaker"
    left_out: int = 0

    def as_dict(self) -> dict[str, Any]:
        # the keys a kind of export has no value for are left out, as in 0.1's dicts
        d = {k: v for k, v in super().as_dict().items() if v is not None}
        if self.by == "speaker":
            del d["by"], d["left_out"]
        return d


@dataclass
class ExportRows:
    """What a matrix export writes, one entry per row, in item (then time) order:
    `rows` into the model's arrays, `owners` into the selected items; for a window
    model also each row's start and end (seconds from its item's start)."""

    rows: np.ndarray
    owners: np.ndarray
    starts: np.ndarray | None = None
    ends: np.ndarray | None = None

    @property
    def windowed(self) -> bool:
        return self.starts is not None

    def key(self, k: int, uid: str) -> str:
        """Row k's id: the item's, or for a window Kaldi's subsegment id
        `<item>-<start_ms:07d>-<end_ms:07d>`."""
        if self.starts is None or self.ends is None:
            return uid
        return f"{uid}-{int(round(self.starts[k] * 1000)):07d}-{int(round(self.ends[k] * 1000)):07d}"


def export_rows(arrays: ModelArrays, items: list[sqlite3.Row], windowed: bool) -> ExportRows:
    """The rows of the selected done items (`selection.COLUMNS`): one each, or every
    window of each."""
    firsts = np.array([r["row"] for r in items], dtype=np.int64)
    if not windowed:
        return ExportRows(firsts, np.arange(len(items)))
    counts = np.array([r["row_count"] or 1 for r in items], dtype=np.int64)
    owners = np.repeat(np.arange(len(items)), counts)
    rows = np.repeat(firsts, counts) + (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts))
    spans = np.zeros((0, 2), dtype=np.float32)
    if len(rows):
        low, high = int(rows.min()), int(rows.max()) + 1
        spans = arrays.read_spans(low, high)[rows - low].astype(np.float64)
    return ExportRows(rows, owners, spans[:, 0].round(3), spans[:, 1].round(3))


def group_of(item: sqlite3.Row, by: str) -> str | None:
    """What an export writes as the item's speaker: its label, or with by="cluster" its
    pseudo-speaker `<dataset>/<cluster>` (None: not clustered, left out). `by` is checked
    once by `grouped`, which every export calls first."""
    if by == "speaker":
        return item["speaker"]
    return None if item["cluster"] is None else f"{item['dataset'] or ''}/{item['cluster']}"


def grouped(items: list[sqlite3.Row], by: str) -> tuple[list[sqlite3.Row], int]:
    """(the items an export grouped `by` writes, how many it leaves out: unclustered)."""
    check_by(by)
    kept = [r for r in items if group_of(r, by) is not None]
    return kept, len(items) - len(kept)


def export_outcome(store: Manifest, model: ModelRecord, selection: Selection = Selection(), left_out: int = 0) -> Outcome:
    """What an export covered of its selected items: done (written), failed, and left:
    not extracted yet, held by a running extraction, or (grouped by cluster) not
    clustered yet."""
    outcome = coverage(store.conn, model.id, selection, store.model_key(model))
    if left_out:
        outcome.done -= left_out
        outcome.left += left_out
        unclustered = f"{left_out} embedded but not clustered yet (run `embstore cluster` on their dataset)"
        outcome.why_left = "; ".join(filter(None, [outcome.why_left, unclustered]))
    return outcome
