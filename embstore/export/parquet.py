"""`export-parquet`: the embeddings as Parquet shards that `datasets`, DuckDB, Polars and
pyarrow read as they are.

Columns: id, speaker, dataset, path (the source audio: a file, or a dataset row's
address `SHARD#row=N`), start, end (seconds in it; null: the file's start / end),
embedding as `fixed_size_list<float32>[dim]`; cluster when any item has a pseudo-speaker
label; for a window model one row per window, id its subsegment id, `item` the item's
id, start/end the window's. The schema metadata holds the model (`embstore`: name, spec,
fingerprint, dim) and the `datasets` features (`huggingface`), so
`datasets.Dataset.from_parquet` types the embedding as a fixed-length float32 list.

Shards cover fixed ranges of the store's item numbers (`part-00000.parquet` the first
SHARD_ITEMS), in row groups of ROW_GROUP rows. Incremental: OUT/.embstore-export.json
records a digest of each shard's contents, so a second export rewrites only the shards
whose items changed (new, removed, re-extracted, relabelled) and deletes emptied ones;
a new model rewrites all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any


from embstore.api import Report
from embstore.arrays.zarr_arrays import ModelArrays
from embstore.errors import StoreError
from embstore.export.files import ExportRows, export_outcome, export_rows, output_folder
from embstore.interop import need
from embstore.interop.hf import embedding_schema, embedding_table
from embstore.manifest.database import Manifest
from embstore.outcome import Outcome
from embstore.paths import write_atomic

SHARD_ITEMS = 100_000  # item numbers per shard
ROW_GROUP = 16_384  # rows per row group: ~12 MiB of 192-d vectors, a reader's unit
INDEX = ".embstore-export.json"


@dataclass
class ParquetExport(Report):
    """What `export-parquet` wrote: `items` (`rows`: windows of a window model), shards
    `written` this time, `unchanged` and `removed`, the `files` OUT now holds."""

    out: str
    model: str
    fingerprint: str
    dim: int
    items: int = 0
    rows: int = 0
    written: int = 0
    unchanged: int = 0
    removed: int = 0
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    outcome: Outcome = field(default_factory=Outcome)


def _digest(items: list[sqlite3.Row], schema_key: str) -> str:
    """What a shard's file holds; it is rewritten when this changes."""
    h = hashlib.blake2b(schema_key.encode(), digest_size=16)
    for r in items:
        h.update("\0".join(str(r[c]) for c in ("uid", "row", "row_count", "speaker", "dataset", "cluster", "root",
                                             "path", "start", "end")).encode("utf-8", "surrogatepass"))
        h.update(b"\1")
    return h.hexdigest()


def _shard_columns(items: list[sqlite3.Row], entries: ExportRows, cluster: bool) -> dict[str, list[Any]]:
    owners = [items[k] for k in entries.owners.tolist()]
    starts: list[Any] = [r["start"] for r in owners]
    ends: list[Any] = [r["end"] for r in owners]
    if entries.starts is not None and entries.ends is not None:
        starts = [round((r["start"] or 0.0) + float(s), 3) for r, s in zip(owners, entries.starts)]
        ends = [round((r["start"] or 0.0) + float(e), 3) for r, e in zip(owners, entries.ends)]
    columns: dict[str, list[Any]] = {
        "id": [entries.key(k, r["uid"]) for k, r in enumerate(owners)],
        "speaker": [r["speaker"] for r in owners], "dataset": [r["dataset"] for r in owners],
        "path": [os.path.join(r["root"], r["path"]) for r in owners], "start": starts, "end": ends,
    }
    if entries.windowed:
        columns["item"] = [r["uid"] for r in owners]
    if cluster:
        columns["cluster"] = [r["cluster"] for r in owners]
    return columns


def _write_shard(path: str, schema: Any, arrays: ModelArrays, items: list[sqlite3.Row], windowed: bool,
                 cluster: bool) -> int:
    """One shard, written beside its name and renamed into place; its row count."""
    import pyarrow.parquet as pq

    entries = export_rows(arrays, items, windowed)
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for first in range(0, len(entries.rows), ROW_GROUP):
                part = ExportRows(
                    entries.rows[first : first + ROW_GROUP], entries.owners[first : first + ROW_GROUP],
                    None if entries.starts is None else entries.starts[first : first + ROW_GROUP],
                    None if entries.ends is None else entries.ends[first : first + ROW_GROUP],
                )
                vectors = arrays.read_rows(part.rows)
                writer.write_table(embedding_table(schema, _shard_columns(items, part, cluster), vectors),
                                   row_group_size=ROW_GROUP)
        os.replace(tmp, path)
    except BaseException:
        # any failure, not only the disk's: no half shard is left beside the whole one
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(entries.rows)


def export_parquet(store: Manifest, out: str | os.PathLike, model: str | None = None, force: bool = False) -> ParquetExport:
    """Write OUT/part-NNNNN.parquet (see the module's docstring); `force`: every shard."""
    need("pyarrow", "parquet", "export-parquet")
    started = time.monotonic()
    m, items = store.done_rows(model, kind=None)
    out_path = output_folder(out)
    cluster = any(r["cluster"] is not None for r in items)
    info = {"model": store.model_key(m), "spec": m.spec, "fingerprint": m.fingerprint, "dim": m.dim,
            "kind": "windows" if m.windowed else "item"}
    schema = embedding_schema(m.dim, cluster, m.windowed, info)
    schema_key = json.dumps([info, cluster, SHARD_ITEMS], sort_keys=True)
    index_path = os.path.join(out_path, INDEX)
    try:
        with open(index_path, encoding="utf-8") as f:
            before: dict[str, str] = json.load(f).get("shards", {})
    except (OSError, ValueError):
        before = {}
    shards: dict[str, list[sqlite3.Row]] = {}
    for r in items:
        shards.setdefault(f"part-{r['item_id'] // SHARD_ITEMS:05d}.parquet", []).append(r)
    report = ParquetExport(out_path, info["model"], m.fingerprint, m.dim, items=len(items))
    arrays = store.model_arrays(m)
    after: dict[str, str] = {}
    try:
        for name, members in sorted(shards.items()):
            after[name] = _digest(members, schema_key)
            path = os.path.join(out_path, name)
            if not force and before.get(name) == after[name] and os.path.isfile(path):
                report.unchanged += 1
                report.rows += sum((r["row_count"] or 1) if m.windowed else 1 for r in members)
                continue
            report.rows += _write_shard(path, schema, arrays, members, m.windowed, cluster)
            report.written += 1
        for name in sorted(set(before) - set(after)):
            if os.path.isfile(os.path.join(out_path, name)):
                os.unlink(os.path.join(out_path, name))
            report.removed += 1
        write_atomic(index_path, (json.dumps({"model": info, "shards": after}, indent=1) + "\n").encode("utf-8"))
    except OSError as exc:
        raise StoreError(f"cannot write to {out_path}: {exc.strerror or exc}") from None
    report.files = sorted(after)
    report.outcome = export_outcome(store, m)
    report.seconds = round(time.monotonic() - started, 3)
    return report
