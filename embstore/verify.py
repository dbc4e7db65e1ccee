"""`verify`: check that a store's manifest and its embedding arrays agree.

What is checked, per model (all read-only, safe while an `extract` is running: the
manifest is read in one snapshot and committed rows are never rewritten in place):

- the SQLite file itself (`PRAGMA quick_check`);
- the arrays: present when rows were committed, shaped [>= rows, dim], `item_ids` as
  long as `vectors`;
- every done task has a row, inside the committed row count, and no item has two tasks;
- every referenced row holds the embedding of its task's item (the item id stored next
  to the vector), or of an item with identical audio (dedup shares rows); two tasks of
  different audio never share a row;
- every referenced vector is finite and non-zero;
- every chunk file under the committed rows exists and decodes (reported by its path);
- with `deep=N`: N random done items are embedded again with the model and compared.

Problems make `ok` false; warnings are things a next `extract` repairs by itself
(claims of dead processes) or that cannot be confirmed (a row shared with an item whose
file changed since).
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from embstore.api import Report
from embstore.audio.io import content_hash
from embstore.extract.reference import ReferenceEmbedder
from embstore.manifest import reads
from embstore.manifest.connection import read_snapshot
from embstore.manifest.database import Manifest
from embstore.manifest.registry import ModelRecord
from embstore.manifest.tasks import claim_owners, committed_rows, owner_is_dead
from embstore.paths import ARRAYS_NAME
from embstore.vectors import finite_nonzero

# a recomputed fp32 embedding equals the stored one to float rounding
DEEP_MIN_COSINE = 0.9999
# bf16/fp16 autocast and trimmed batches are not bit-stable between batch shapes
DEEP_MIN_COSINE_LOOSE = 0.99
# at most this many examples of one kind of problem are listed
EXAMPLES = 10


@dataclass
class Finding:
    check: str  # short stable name, for --json consumers
    message: str  # one line for people
    model: str | None = None
    count: int = 1
    examples: list[Any] = field(default_factory=list)


@dataclass
class VerifyReport(Report):
    store: str
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "ok": self.ok,
            "problems": [asdict(p) for p in self.problems],
            "warnings": [asdict(w) for w in self.warnings],
            "models": self.models,
            "seconds": round(self.seconds, 3),
        }


def verify_store(store: Manifest, model: str | None = None, deep: int = 0, seed: int | None = None) -> VerifyReport:
    """Check `store` (one model, or all); `deep` items per model are recomputed."""
    started = time.monotonic()
    report = VerifyReport(store=str(store.path))
    _check_sqlite(store, report)
    if not report.ok:
        report.seconds = time.monotonic() - started
        return report
    records = [store.resolve_model(model, kind=None)] if model else store.models()
    for record in records:
        _ModelCheck(store, record, report).run(deep, seed)
    report.seconds = time.monotonic() - started
    return report


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest cosine of matching rows (nan where a row is zero or not finite)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.einsum("ij,ij->i", a, b) / norms
    cos[~(norms > 0) | ~np.isfinite(norms)] = np.nan
    return float(np.nan) if np.isnan(cos).any() else float(cos.min())


def _one_pair_per_row(block: np.ndarray) -> np.ndarray:
    """(item, row, row count) triples as (item, row) pairs, one per row: a window model's
    task owns `row count` rows, and every check below holds row by row."""
    counts = block[:, 2]
    if (counts == 1).all():
        return block[:, :2]
    items = np.repeat(block[:, 0], counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.stack([items, np.repeat(block[:, 1], counts) + offsets], axis=1)


def _check_sqlite(store: Manifest, report: VerifyReport) -> None:
    try:
        result = [r[0] for r in store.conn.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as exc:
        report.problems.append(Finding("sqlite", f"manifest.db cannot be checked: {exc}"))
        return
    if result != ["ok"]:
        report.problems.append(
            Finding("sqlite", f"manifest.db is damaged: {result[0]}", count=len(result), examples=result[:EXAMPLES])
        )


class _ModelCheck:
    def __init__(self, store: Manifest, model: ModelRecord, report: VerifyReport):
        self.store = store
        self.model = model
        self.key = store.model_key(model)
        self.report = report
        self.info: dict[str, Any] = {"rows": model.rows, "dim": model.dim}
        report.models[self.key] = self.info

    def _finding(self, check: str, message: str, examples: list[Any] | None, count: int | None) -> Finding:
        examples = list(examples or [])
        n = count if count is not None else max(len(examples), 1)
        return Finding(check, message, self.key, n, examples[:EXAMPLES])

    def problem(self, check: str, message: str, examples: list[Any] | None = None, count: int | None = None) -> None:
        self.report.problems.append(self._finding(check, message, examples, count))

    def warning(self, check: str, message: str, examples: list[Any] | None = None, count: int | None = None) -> None:
        self.report.warnings.append(self._finding(check, message, examples, count))

    # -- the manifest, in one read snapshot -------------------------------------------

    def _snapshot(self) -> tuple[int, np.ndarray, np.ndarray, list[int]]:
        """(committed rows, done tasks' item ids, their rows (sorted by row), items done without a row)."""
        model_id = self.model.id
        # one read snapshot, so a running writer cannot skew it
        with read_snapshot(self.store.conn) as conn:
            committed = committed_rows(conn, model_id)
            no_row = reads.done_without_row(conn, model_id)
            # numpy blocks, not Python lists: 10 M done items stay ~160 MB
            blocks = [np.zeros((0, 2), dtype=np.int64)]
            self.tasks_done = 0
            for batch in reads.done_row_ranges(conn, model_id):
                block = np.array(batch, dtype=np.int64)
                self.tasks_done += len(block)
                blocks.append(_one_pair_per_row(block))
            pairs = np.concatenate(blocks)
            twice = reads.items_with_several_tasks(conn, model_id)
            owners = claim_owners(conn, model_id)
        if twice:
            self.problem("task-twice", f"{len(twice)} items have several tasks for this model",
                         [{"item_id": r[0], "tasks": r[1]} for r in twice])
        gone = [owner for owner in owners if owner and owner_is_dead(owner)]
        if gone:
            self.warning("dead-claims", f"claims held by {len(gone)} process(es) that no longer run;"
                         " the next extract gives them back", gone)
        return committed, pairs[:, 0].copy(), pairs[:, 1].copy(), no_row

    # -- the checks ---------------------------------------------------------------------

    def run(self, deep: int, seed: int | None) -> None:
        committed, items, rows, no_row = self._snapshot()
        self.info.update(rows=committed, done=int(self.tasks_done + len(no_row)))
        if no_row:
            self.problem("done-without-row", f"{len(no_row)} done items have no row", [{"item_id": i} for i in no_row])
        outside = rows >= committed
        negative = rows < 0
        if outside.any():
            bad = np.flatnonzero(outside)
            self.problem(
                "row-past-count",
                f"{len(bad)} done items point past the {committed} committed rows",
                [{"item_id": int(items[k]), "row": int(rows[k])} for k in bad[:EXAMPLES]], count=len(bad),
            )
        if negative.any():
            bad = np.flatnonzero(negative)
            self.problem("negative-row", f"{len(bad)} done items have a negative row",
                         [{"item_id": int(items[k]), "row": int(rows[k])} for k in bad[:EXAMPLES]], count=len(bad))
        vec, ids = self._open_arrays(committed)
        self._check_shared_rows(items, rows)
        if vec is None:
            return
        stored_ids = self._scan_chunks(vec, ids, committed, items, rows)
        self._check_owners(items, rows, stored_ids)
        if deep > 0:
            self._deep(deep, seed)

    def _open_arrays(self, committed: int):
        arrays = self.store.model_arrays(self.model)
        if committed == 0 and not os.path.exists(os.path.join(arrays.zarr_path, arrays.group_name)):
            return None, None  # nothing written yet: nothing to disagree about
        try:
            vec, ids = arrays.arrays()
        except Exception as exc:
            self.problem("arrays", f"cannot open the arrays {arrays.group_name}: {type(exc).__name__}: {exc}")
            return None, None
        if vec is None:
            if committed > 0:
                self.problem("arrays", f"the manifest commits {committed} rows but embeddings.zarr has no group"
                             f" {arrays.group_name}")
            return None, None
        self.info["array_rows"] = int(vec.shape[0])
        if vec.ndim != 2 or vec.shape[1] != self.model.dim:
            self.problem("arrays",
                         f"vectors have shape {tuple(vec.shape)}, the model's dimension is {self.model.dim}")
            return None, None
        if vec.shape[0] < committed:
            self.problem("row-count", f"the manifest commits {committed} rows but the vectors array has only"
                         f" {vec.shape[0]}")
        if ids.shape[0] < min(committed, vec.shape[0]):
            self.problem("row-count", f"the item_ids array has {ids.shape[0]} rows, fewer than the"
                         f" {committed} committed")
        return vec, ids

    def _chunk_path(self, array, index: int) -> str:
        key = array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))
        return os.path.join(ARRAYS_NAME, self.model.array_path, os.path.basename(array.path), key)

    def _scan_chunks(self, vec, ids, committed: int, items: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Read every chunk under the committed rows; returns the stored item id of each
        referenced row (-2 where its chunk could not be read)."""
        store_root = self.store.path
        stored = np.full(len(rows), -2, dtype=np.int64)
        limit = min(committed, vec.shape[0], ids.shape[0])
        referenced = rows[(rows >= 0) & (rows < limit)]
        checked = 0
        nonfinite: list[dict[str, Any]] = []
        nonfinite_count = 0
        missing: list[str] = []
        for array, is_vectors in ((vec, True), (ids, False)):
            step = int((array.shards or array.chunks)[0])
            for index in range((limit + step - 1) // step):
                lo, hi = index * step, min((index + 1) * step, limit)
                path = self._chunk_path(array, index)
                if not os.path.exists(store_root / path):
                    # zarr would silently read fill values (NaN, -1) for it
                    missing.append(f"{path} (rows {lo}-{hi - 1})")
                    continue
                try:
                    block = np.asarray(array[lo:hi])
                except Exception as exc:
                    self.problem("chunk-unreadable",
                                 f"chunk unreadable: {path} (rows {lo}-{hi - 1}): {type(exc).__name__}: {exc}", [path])
                    continue
                checked += 1
                a, b = np.searchsorted(rows, lo), np.searchsorted(rows, hi)
                if a == b:
                    continue
                local = rows[a:b] - lo
                if is_vectors:
                    picked = block[local]
                    finite = np.isfinite(picked).all(axis=1)
                    bad = np.flatnonzero(~finite_nonzero(picked))
                    nonfinite_count += len(bad)
                    for k in bad[: EXAMPLES - len(nonfinite)]:
                        nonfinite.append({"row": int(rows[a + k]), "item_id": int(items[a + k]),
                                          "why": "non-finite" if not finite[k] else "zero"})
                else:
                    stored[a:b] = block[local]
        self.info["chunks_checked"] = checked
        if missing:
            head = f"chunk file missing: {missing[0]}"
            self.problem("chunk-missing", head if len(missing) == 1 else
                         f"{len(missing)} chunk files missing under the committed rows, first: {missing[0]}",
                         missing, count=len(missing))
        group_dir = os.path.join(self.store.zarr_path, self.model.array_path)
        partial = [os.path.join(d, f) for d, _, fs in os.walk(group_dir) for f in fs if f.endswith(".partial")]
        if partial:
            # a writer killed while replacing a chunk leaves its temporary file; harmless
            self.warning("partial-files", f"{len(partial)} leftover temporary chunk files (*.partial) from"
                         " interrupted writes; safe to delete", [os.path.relpath(p, self.store.path) for p in partial],
                         count=len(partial))
        self.info["referenced_rows"] = int(len(np.unique(referenced)))
        if nonfinite_count:
            self.problem("bad-vector", f"{nonfinite_count} referenced rows hold non-finite or zero vectors",
                         nonfinite, count=nonfinite_count)
        return stored

    def _item_facts(self, item_ids: list[int]) -> dict[int, sqlite3.Row]:
        """content hash, span and this model's task of each item."""
        return reads.item_facts(self.store.conn, self.model.id, item_ids)

    @staticmethod
    def _same_audio(a: sqlite3.Row | None, b: sqlite3.Row | None) -> bool:
        return (
            a is not None and b is not None and a["content_hash"] is not None
            and a["content_hash"] == b["content_hash"] and a["start"] == b["start"] and a["end"] == b["end"]
        )

    def _check_shared_rows(self, items: np.ndarray, rows: np.ndarray) -> None:
        """Rows referenced by several done tasks: allowed only between identical audio."""
        if len(rows) < 2:
            self.info["shared_rows"] = 0
            return
        same = np.flatnonzero(rows[1:] == rows[:-1])
        shared = np.unique(rows[same])
        self.info["shared_rows"] = int(len(shared))
        if not len(shared):
            return
        groups: dict[int, list[int]] = {}
        for k in np.flatnonzero(np.isin(rows, shared)):
            groups.setdefault(int(rows[k]), []).append(int(items[k]))
        facts = self._item_facts(sorted({i for g in groups.values() for i in g}))
        bad = []
        for row, members in groups.items():
            first = facts.get(members[0])
            if not all(self._same_audio(first, facts.get(m)) for m in members[1:]):
                bad.append({"row": row, "items": [facts[m]["uid"] if m in facts else m for m in members]})
        if bad:
            self.problem("row-shared", f"{len(bad)} rows are shared by items of different audio", bad, count=len(bad))

    def _check_owners(self, items: np.ndarray, rows: np.ndarray, stored: np.ndarray) -> None:
        """The item id stored beside each referenced row is the task's item, or dedup's twin."""
        readable = stored != -2
        differ = np.flatnonzero(readable & (stored != items))
        if not len(differ):
            return
        never = [k for k in differ if stored[k] < 0]
        if never:
            self.problem("row-unwritten", f"{len(never)} done items point to rows that were never written",
                         [{"item_id": int(items[k]), "row": int(rows[k])} for k in never[:EXAMPLES]], count=len(never))
        others = [k for k in differ if stored[k] >= 0]
        if not others:
            return
        facts = self._item_facts(sorted({int(items[k]) for k in others} | {int(stored[k]) for k in others}))
        wrong, unconfirmed, twins = [], [], 0
        for k in others:
            mine, theirs = facts.get(int(items[k])), facts.get(int(stored[k]))
            example = {"row": int(rows[k]), "item": mine["uid"] if mine else int(items[k]),
                       "stored_item": theirs["uid"] if theirs else int(stored[k])}
            if self._same_audio(mine, theirs):
                twins += 1
            elif theirs is not None and (
                theirs["removed"] or not (theirs["status"] == "done" and theirs["row"] == rows[k])
            ):
                # the row's own item changed (or went away) after a twin reused the row:
                # its content hash now describes the new audio, so sameness cannot be shown
                unconfirmed.append(example)
            else:
                wrong.append(example)
        self.info["dedup_rows_checked"] = twins
        if wrong:
            self.problem("row-owner", f"{len(wrong)} done items point to a row computed for another item"
                         " with different audio", wrong, count=len(wrong))
        if unconfirmed:
            self.warning("row-owner-changed", f"{len(unconfirmed)} items share a row with an item whose audio"
                         " changed since; re-extract them to be sure", unconfirmed, count=len(unconfirmed))

    # -- deep: recompute some items -----------------------------------------------------

    def _deep(self, n: int, seed: int | None) -> None:
        candidates = reads.done_items_below(self.store.conn, self.model.id, self.model.rows)
        picked = random.Random(seed).sample(candidates, min(n, len(candidates)))
        deep: dict[str, Any] = {"requested": n, "checked": 0, "min_cosine": None, "skipped": []}
        self.info["deep"] = deep
        if not picked:
            return
        exact = self.model.compute_dtype == "fp32" and self.model.max_trim_frames is None
        threshold = DEEP_MIN_COSINE if exact else DEEP_MIN_COSINE_LOOSE
        deep["threshold"] = threshold
        try:
            reference = ReferenceEmbedder(self.model)
        except Exception as exc:
            self.problem("deep", f"cannot load model {self.model.spec!r} to recompute: {exc}")
            return
        arrays = self.store.model_arrays(self.model)
        low = []
        cosines = []
        for p in picked:
            path = os.path.join(p["root"], p["path"])
            stored = arrays.read_rows(np.arange(p["row"], p["row"] + p["row_count"], dtype=np.int64))
            try:
                if p["content_hash"] and content_hash(path) != p["content_hash"]:
                    deep["skipped"].append({"item": p["uid"], "why": "file changed since extraction (rescan)"})
                    continue
                fresh = reference.embed(path, p["start"], p["end"])
            except Exception as exc:
                deep["skipped"].append({"item": p["uid"], "why": f"cannot recompute: {type(exc).__name__}: {exc}"})
                continue
            if fresh.shape != stored.shape:
                cosines.append(float("nan"))
                low.append({"item": p["uid"], "row": int(p["row"]), "cosine": None,
                            "why": f"{len(fresh)} rows recomputed, {len(stored)} stored"})
                continue
            cos = _min_cosine(fresh, stored)
            cosines.append(cos)
            if not cos >= threshold:
                low.append({"item": p["uid"], "row": int(p["row"]), "cosine": round(cos, 6)})
        deep["checked"] = len(cosines)
        deep["min_cosine"] = round(min(cosines), 7) if cosines else None
        if low:
            self.problem("deep-mismatch", f"{len(low)} of {len(cosines)} recomputed items differ from their stored"
                         f" vector (cosine < {threshold})", low, count=len(low))
        if deep["skipped"]:
            self.warning("deep-skipped", f"{len(deep['skipped'])} items picked for recomputing could not be",
                         deep["skipped"])
