"""`export-kaldi`: xvector.ark/.scp (kaldiio), utt2spk and spk2utt."""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from typing import Any, Iterator


from embstore.errors import StoreError
from embstore.export.files import MatrixExport, export_outcome, export_rows, group_of, grouped, output_folder
from embstore.paths import write_atomic
from embstore.manifest.database import Manifest


def _kaldi_token(text: str | None) -> str:
    # Kaldi tables split on whitespace: keys and speakers must not hold any
    return re.sub(r"\s+", "_", text or "") or "_"


def _batches(rows: list, size: int = 65536) -> Iterator[list]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def export_kaldi(store: Manifest, out: str | os.PathLike, model: str | None = None, by: str = "speaker",
                 matrix: bool = False) -> MatrixExport:
    """OUT/xvector.ark + xvector.scp (kaldiio), utt2spk, spk2utt; keys are item ids
    (whitespace turned into `_`), sorted, so Kaldi tools and kaldiio read them as tables.
    A window model's keys are subsegment ids `<item>-<start_ms:07d>-<end_ms:07d>`, with
    a `segments` file (`<subsegment> <item> <start> <end>`). by="cluster": utt2spk names
    the pseudo-speakers of `embstore cluster`, and unclustered items are left out.
    matrix: each vector as a 1 x dim matrix (Lhotse's Kaldi reader and Kaldi's
    `copy-matrix` expect matrices; WeSpeaker and `ivector-*` tools read vectors)."""
    from kaldiio import WriteHelper

    started = time.monotonic()
    m, items = store.done_rows(model, kind=None)
    items, left_out = grouped(items, by)
    out_path = os.path.abspath(os.fspath(out))
    if "," in out_path or re.search(r"\s", out_path):
        raise StoreError(f"{out_path}: Kaldi write specifiers cannot hold commas or spaces; pick another folder")
    output_folder(out_path)
    arrays = store.model_arrays(m)
    entries = export_rows(arrays, items, m.windowed)
    keyed: dict[str, int] = {}  # key -> entry
    for k, owner in enumerate(entries.owners.tolist()):
        key = _kaldi_token(entries.key(k, items[owner]["uid"]))
        if key in keyed:
            first = items[entries.owners[keyed[key]]]["uid"]
            raise StoreError(f"items {first!r} and {items[owner]['uid']!r} both become Kaldi key {key!r}")
        keyed[key] = k
    keys = sorted(keyed)
    ark, scp = os.path.join(out_path, "xvector.ark"), os.path.join(out_path, "xvector.scp")
    tmp_ark, tmp_scp = ark + ".tmp", scp + ".tmp"
    with WriteHelper(f"ark,scp:{tmp_ark},{tmp_scp}") as writer:
        for batch in _batches(keys):
            vectors = arrays.read_rows(entries.rows[[keyed[k] for k in batch]])
            for key, vector in zip(batch, vectors):
                writer(key, vector[None, :] if matrix else vector)
    # the scp names the ark it was written to: point it at the final name
    with open(tmp_scp, encoding="utf-8") as f:
        lines = [line.replace(f" {tmp_ark}:", f" {ark}:", 1) for line in f]
    write_atomic(tmp_scp, "".join(lines).encode("utf-8"))
    os.replace(tmp_ark, ark)
    os.replace(tmp_scp, scp)
    owner_of = {k: items[entries.owners[keyed[k]]] for k in keys}
    spk_of = {k: _kaldi_token(group_of(owner_of[k], by)) for k in keys}
    write_atomic(os.path.join(out_path, "utt2spk"), "".join(f"{k} {spk_of[k]}\n" for k in keys).encode("utf-8"))
    by_speaker: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        by_speaker[spk_of[k]].append(k)
    write_atomic(
        os.path.join(out_path, "spk2utt"),
        "".join(f"{s} {' '.join(by_speaker[s])}\n" for s in sorted(by_speaker)).encode("utf-8"),
    )
    files = ["xvector.ark", "xvector.scp", "utt2spk", "spk2utt"]
    if entries.starts is not None and entries.ends is not None:
        starts, ends = entries.starts, entries.ends
        write_atomic(os.path.join(out_path, "segments"), "".join(
            f"{k} {_kaldi_token(owner_of[k]['uid'])} {starts[keyed[k]]:.3f} {ends[keyed[k]]:.3f}\n"
            for k in keys).encode("utf-8"))
        files.append("segments")
    return MatrixExport(
        out_path, store.model_key(m), m.fingerprint, len(items), files, round(time.monotonic() - started, 3),
        export_outcome(store, m, left_out=left_out), speakers=len(by_speaker),
        windows=len(keys) if entries.windowed else None, by=by, left_out=left_out,
    )
