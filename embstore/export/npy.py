"""`export-npy`: one float32 matrix with row labels."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from embstore.paths import write_atomic
from embstore.manifest.database import Manifest


def _line(text: str | None) -> str:
    # one value per line: a newline inside an id would shift every later line
    return (text or "").replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def export_npy(store: Manifest, out: str | os.PathLike, model: str | None = None) -> dict[str, Any]:
    """OUT/embeddings.npy (float32 [n, dim]) with ids.txt, speakers.txt and datasets.txt
    (line i describes row i; backslash and newline escaped as \\\\, \\n), plus export.json."""
    started = time.monotonic()
    m, rows = store.done_rows(model)
    out_path = os.path.abspath(os.fspath(out))
    os.makedirs(out_path, exist_ok=True)
    target = os.path.join(out_path, "embeddings.npy")
    tmp = os.path.join(out_path, ".embeddings.npy.tmp")
    matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(rows), int(m["dim"])))
    arrays = store.model_arrays(m)
    for start in range(0, len(rows), 65536):
        batch = rows[start : start + 65536]
        matrix[start : start + len(batch)] = arrays.read_rows(np.array([r["row"] for r in batch], dtype=np.int64))
    matrix.flush()
    del matrix
    os.replace(tmp, target)
    for name, column in (("ids.txt", "uid"), ("speakers.txt", "speaker"), ("datasets.txt", "dataset")):
        write_atomic(os.path.join(out_path, name), "".join(_line(r[column]) + "\n" for r in rows).encode("utf-8"))
    info = {
        "model": store.model_key(m), "spec": m["spec"], "fingerprint": m["fingerprint"], "dim": int(m["dim"]),
        "items": len(rows), "files": ["embeddings.npy", "ids.txt", "speakers.txt", "datasets.txt"],
    }
    write_atomic(os.path.join(out_path, "export.json"), (json.dumps(info, indent=2) + "\n").encode("utf-8"))
    info.update(out=out_path, seconds=round(time.monotonic() - started, 3))
    return info
