"""`export-npy`: one float32 matrix with row labels."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from embstore.export.files import MatrixExport, export_outcome, export_rows, group_of, grouped, output_folder
from embstore.paths import write_atomic
from embstore.manifest.database import Manifest


def _line(text: str | None) -> str:
    # one value per line: a newline inside an id would shift every later line
    return (text or "").replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def export_npy(store: Manifest, out: str | os.PathLike, model: str | None = None, by: str = "speaker") -> MatrixExport:
    """OUT/embeddings.npy (float32 [n, dim]) with ids.txt, speakers.txt and datasets.txt
    (line i describes row i; backslash and newline escaped as \\\\, \\n), plus export.json.
    A window model: one row per window, ids are Kaldi subsegment ids
    (`<item>-<start_ms:07d>-<end_ms:07d>`), and items.txt, starts.npy, ends.npy say
    whose window each row is and when. by="cluster": speakers.txt holds the
    pseudo-speakers of `embstore cluster`, and unclustered items are left out."""
    started = time.monotonic()
    m, items = store.done_rows(model, kind=None)
    items, left_out = grouped(items, by)
    out_path = os.path.abspath(os.fspath(out))
    output_folder(out_path)
    arrays = store.model_arrays(m)
    entries = export_rows(arrays, items, m.windowed)
    n = len(entries.rows)
    target = os.path.join(out_path, "embeddings.npy")
    tmp = os.path.join(out_path, ".embeddings.npy.tmp")
    matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, m.dim))
    for start in range(0, n, 65536):
        matrix[start : start + 65536] = arrays.read_rows(entries.rows[start : start + 65536])
    matrix.flush()
    del matrix
    os.replace(tmp, target)
    owners = [items[k] for k in entries.owners.tolist()]
    columns = {
        "ids.txt": [entries.key(k, r["uid"]) for k, r in enumerate(owners)],
        "speakers.txt": [group_of(r, by) for r in owners],
        "datasets.txt": [r["dataset"] for r in owners],
    }
    if entries.windowed:
        columns["items.txt"] = [r["uid"] for r in owners]
    for name, values in columns.items():
        write_atomic(os.path.join(out_path, name), "".join(_line(v) + "\n" for v in values).encode("utf-8"))
    files = ["embeddings.npy", *columns]
    if entries.windowed:
        for name, values in (("starts.npy", entries.starts), ("ends.npy", entries.ends)):
            with open(os.path.join(out_path, name), "wb") as f:
                np.save(f, np.asarray(values, dtype=np.float64))
            files.append(name)
    info = {
        "model": store.model_key(m), "spec": m.spec, "fingerprint": m.fingerprint, "dim": m.dim,
        "items": len(items), "files": files,
    }
    if entries.windowed:
        info["windows"] = n
    if by != "speaker":
        info.update(by=by, left_out=left_out)
    write_atomic(os.path.join(out_path, "export.json"), (json.dumps(info, indent=2) + "\n").encode("utf-8"))
    return MatrixExport(
        out_path, info["model"], m.fingerprint, len(items), files, round(time.monotonic() - started, 3),
        export_outcome(store, m, left_out=left_out), spec=m.spec, dim=m.dim,
        windows=n if entries.windowed else None, by=by, left_out=left_out,
    )
