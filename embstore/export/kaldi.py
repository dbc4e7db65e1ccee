"""`export-kaldi`: xvector.ark/.scp (kaldiio), utt2spk and spk2utt."""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections import defaultdict
from typing import Any, Iterator

import numpy as np

from embstore.errors import StoreError
from embstore.paths import write_atomic
from embstore.manifest.database import Manifest


def _kaldi_token(text: str | None) -> str:
    # Kaldi tables split on whitespace: keys and speakers must not hold any
    return re.sub(r"\s+", "_", text or "") or "_"


def _batches(rows: list, size: int = 65536) -> Iterator[list]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def export_kaldi(store: Manifest, out: str | os.PathLike, model: str | None = None) -> dict[str, Any]:
    """OUT/xvector.ark + xvector.scp (kaldiio), utt2spk, spk2utt; keys are item ids
    (whitespace turned into `_`), sorted, so Kaldi tools and kaldiio read them as tables."""
    from kaldiio import WriteHelper

    started = time.monotonic()
    m, rows = store.done_rows(model)
    out_path = os.path.abspath(os.fspath(out))
    if "," in out_path or re.search(r"\s", out_path):
        raise StoreError(f"{out_path}: Kaldi write specifiers cannot hold commas or spaces; pick another folder")
    os.makedirs(out_path, exist_ok=True)
    keyed: dict[str, sqlite3.Row] = {}
    for r in rows:
        key = _kaldi_token(r["uid"])
        if key in keyed:
            raise StoreError(f"items {keyed[key]['uid']!r} and {r['uid']!r} both become Kaldi key {key!r}")
        keyed[key] = r
    keys = sorted(keyed)
    ark, scp = os.path.join(out_path, "xvector.ark"), os.path.join(out_path, "xvector.scp")
    tmp_ark, tmp_scp = ark + ".tmp", scp + ".tmp"
    arrays = store.model_arrays(m)
    with WriteHelper(f"ark,scp:{tmp_ark},{tmp_scp}") as writer:
        for batch in _batches(keys):
            vectors = arrays.read_rows(np.array([keyed[k]["row"] for k in batch], dtype=np.int64))
            for key, vector in zip(batch, vectors):
                writer(key, vector)
    # the scp names the ark it was written to: point it at the final name
    with open(tmp_scp, encoding="utf-8") as f:
        lines = [line.replace(f" {tmp_ark}:", f" {ark}:", 1) for line in f]
    write_atomic(tmp_scp, "".join(lines).encode("utf-8"))
    os.replace(tmp_ark, ark)
    os.replace(tmp_scp, scp)
    spk_of = {k: _kaldi_token(keyed[k]["speaker"]) for k in keys}
    write_atomic(os.path.join(out_path, "utt2spk"), "".join(f"{k} {spk_of[k]}\n" for k in keys).encode("utf-8"))
    by_speaker: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        by_speaker[spk_of[k]].append(k)
    write_atomic(
        os.path.join(out_path, "spk2utt"),
        "".join(f"{s} {' '.join(by_speaker[s])}\n" for s in sorted(by_speaker)).encode("utf-8"),
    )
    return {
        "out": out_path, "model": store.model_key(m), "fingerprint": m["fingerprint"], "items": len(keys),
        "speakers": len(by_speaker), "files": ["xvector.ark", "xvector.scp", "utt2spk", "spk2utt"],
        "seconds": round(time.monotonic() - started, 3),
    }
