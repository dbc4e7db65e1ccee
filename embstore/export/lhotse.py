"""`export-lhotse`: OUT/cuts.jsonl.gz, one cut per embedded item, each with the custom
field `embedding` pointing into OUT/embeddings-<random>.h5 (Lhotse's own `NumpyHdf5Writer`:
lossless float32, never lilcom).

Items scanned from a Lhotse manifest are written as the manifest has them (recording,
supervision with its text, gender, language and custom fields, the cut's custom fields),
one cut per item spanning its supervision; other items get a cut built from their file
(a `Recording` of it, a supervision with id and speaker). Audio Lhotse cannot address
(a dataset row, `SHARD#row=N`) gets a cut without a recording, its address in the
custom field `source`. A window model writes one cut per window (id: Kaldi's subsegment
id `<item>-<start_ms:07d>-<end_ms:07d>`), spanning the window in the source audio.

Reading needs Lhotse only: `CutSet.from_file("OUT/cuts.jsonl.gz")`, `cut.load_embedding()`.
The manifests name the HDF5 file by its absolute path. Each export writes its vectors
to an HDF5 file of a new name (`embeddings-<random>.h5`), then renames its cuts over
`cuts.jsonl.gz` (the one atomic step: a reader opening the cuts sees the old export
or the new one, each with its own HDF5 file, never cuts pointing at a file that is
missing or another export's), then deletes the HDF5 files of earlier exports. A reader
that read the old cuts before the swap and opens their HDF5 file only after the
deletion finds it gone: reread the cuts. A failed export deletes what it wrote and
leaves the previous one as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sqlite3
import time
from typing import Any

from embstore.audio.io import parse_address
from embstore.errors import ScanError, StoreError
from embstore.export.files import ExportRows, MatrixExport, export_outcome, export_rows, output_folder
from embstore.interop import need
from embstore.interop.lhotse import EmbeddingArrays, Original, cut_of, file_recording, originals
from embstore.manifest.connection import select_in
from embstore.manifest.database import Manifest
from embstore.paths import folder_lock

CUTS = "cuts.jsonl.gz"
# this export's arrays, and those of earlier exports (`embeddings.h5` before 0.2)
_H5 = re.compile(r"^embeddings(-[0-9a-f]{8,})?\.h5$")
_TMP_CUTS = re.compile(r"^\.cuts-[0-9a-f]+\.jsonl\.gz$")


def _headers(conn: sqlite3.Connection, item_ids: list[int]) -> dict[int, tuple[int, int, int]]:
    """(sample rate, channels, frames) of each item's file, as the scan read them."""
    rows = select_in(conn, "SELECT i.id, f.sample_rate, f.channels, f.frames FROM items i"
                     " JOIN files f ON f.id = i.file_id WHERE i.id IN ({marks})", item_ids)
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _originals(items: list[sqlite3.Row]) -> dict[str, Original]:
    """The manifest's own items for those scanned from Lhotse manifests still there; a
    manifest gone or broken since: its items get built cuts instead."""
    found: dict[str, Original] = {}
    for manifest in sorted({r["root"] for r in items if r["root_kind"] == "lhotse"}):
        if os.path.isfile(manifest):
            try:
                found.update(originals(manifest))
            except ScanError:
                continue
    return found


def _cut(item: sqlite3.Row, uid: str, entries: ExportRows, k: int, original: Original | None,
         header: tuple[int, int, int] | None) -> Any:
    """The cut of row k (an item, or one window of it)."""
    address = os.path.join(item["root"], item["path"])
    start = item["start"] or 0.0
    duration = (item["end"] - start) if item["end"] is not None else item["duration"]
    if entries.starts is not None and entries.ends is not None:
        start, duration = start + float(entries.starts[k]), float(entries.ends[k] - entries.starts[k])
    if original is not None:
        return cut_of(uid, original, start, duration, item["speaker"], None, None)
    if parse_address(address) is None and header is not None and all(header):
        rate, channels, frames = header
        rec_id = item["uid"] if item["start"] is None and item["end"] is None else os.path.splitext(item["path"])[0]
        recording = file_recording(rec_id, address, rate, channels, frames)
        return cut_of(uid, None, start, duration, item["speaker"], recording, None)
    return cut_of(uid, None, start, duration, item["speaker"], None, address)


def _remove_earlier_files(out_path: str, keep: str) -> None:
    """The HDF5 files of earlier exports, which no cuts name any more, and temporary cuts
    of exports killed mid-way (one that cannot be deleted stays: the export itself is
    complete). Called under the folder's lock: no other export is writing either."""
    for name in os.listdir(out_path):
        if (name != keep and _H5.match(name)) or _TMP_CUTS.match(name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out_path, name))


def export_lhotse(store: Manifest, out: str | os.PathLike, model: str | None = None) -> MatrixExport:
    """Write OUT/cuts.jsonl.gz and OUT/embeddings-<random>.h5 (see the module's docstring)."""
    need("lhotse", "lhotse", "export-lhotse")
    need("h5py", "lhotse", "export-lhotse (HDF5 arrays)")

    started = time.monotonic()
    m, items = store.done_rows(model, kind=None)
    out_path = output_folder(out)
    arrays = store.model_arrays(m)
    entries = export_rows(arrays, items, m.windowed)
    headers = _headers(store.conn, [r["item_id"] for r in items])
    found = _originals(items)
    h5_name = f"embeddings-{secrets.token_hex(6)}.h5"
    # two exports into one folder take turns: each one's cleanup would delete the other's
    # HDF5 file while it is being written, and the cuts published next would name it
    with folder_lock(out_path):
        _write_export(out_path, h5_name, arrays, items, entries, headers, found)
        _remove_earlier_files(out_path, h5_name)
    return MatrixExport(
        out_path, store.model_key(m), m.fingerprint, len(items), [CUTS, h5_name], round(time.monotonic() - started, 3),
        export_outcome(store, m), dim=m.dim, windows=len(entries.rows) if entries.windowed else None,
    )


def _write_export(out_path: str, h5_name: str, arrays: Any, items: list[sqlite3.Row], entries: ExportRows,
                  headers: dict[int, tuple[int, int, int]], found: dict[str, Original]) -> None:
    """The new HDF5 file, then the cuts naming it, published in one rename."""
    from lhotse import CutSet

    cuts_path = os.path.join(out_path, CUTS)
    h5_path = os.path.join(out_path, h5_name)
    tmp_cuts = os.path.join(out_path, f".cuts-{secrets.token_hex(6)}.jsonl.gz")
    try:
        vectors_of = EmbeddingArrays(h5_path, h5_path)
        try:
            with CutSet.open_writer(tmp_cuts, overwrite=True) as writer:
                for first in range(0, len(entries.rows), 65536):
                    vectors = arrays.read_rows(entries.rows[first : first + 65536])
                    for k, vector in enumerate(vectors, first):
                        item = items[entries.owners[k]]
                        key = entries.key(k, item["uid"])
                        original = found.get(item["uid"]) if item["root_kind"] == "lhotse" else None
                        cut = _cut(item, key, entries, k, original, headers.get(item["item_id"]))
                        writer.write(cut.with_custom("embedding", vectors_of.store(key, vector)))
        finally:
            vectors_of.close()
        # the one atomic step: the new cuts, naming the new file, replace the old ones
        os.replace(tmp_cuts, cuts_path)
    except BaseException as exc:
        # any failure (a full disk, a bug, Ctrl-C): what this export wrote goes, the
        # previous export stays whole
        for path in (tmp_cuts, h5_path):
            with contextlib.suppress(OSError):
                os.unlink(path)
        if isinstance(exc, OSError):
            raise StoreError(f"cannot write to {out_path}: {exc.strerror or exc}") from None
        raise
