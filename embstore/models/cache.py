"""Entries of the user cache (`embstore.paths.user_cache_dir`) that processes fill together.

    onnx/<weights fingerprint>/model.onnx, config.yaml     ONNX exports of torch models
    openvino/<fingerprint>/                                OpenVINO's compiled-model blobs
    openvino-ir/<fingerprint>/stem.xml, rest.xml           bf16 graphs split for an f32 stem
    index/<source key>.json                                checkpoint files -> export

Why a user cache and not one per store: an export costs seconds (torch import, tracing)
and does not depend on the store, so a new store with a known model starts at once.

Several processes may fill one entry at the same time (the workers of one run, two runs
on one machine, a cluster sharing a home directory over NFS with working locks). An
entry is built under an exclusive lock on `<entry>.lock`, into a private temporary
folder, and its files are moved in with `os.replace`, the entry's marker file last:
a reader that sees the marker sees every file, whole. Whoever takes the lock second
finds the marker and builds nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from embstore.paths import file_lock, user_cache_dir, write_atomic_text

__all__ = ["entry_dir", "fill_once", "locked", "read_json", "write_json"]

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def entry_dir(kind: str, key: str) -> Path:
    """The folder of one cache entry; `kind` and `key` must be plain names (no paths)."""
    for part in (kind, key):
        if not _KEY.fullmatch(part):
            raise ValueError(f"not a cache key: {part!r}")
    return user_cache_dir() / kind / key


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` (a `folder.lock` file beside it), between processes."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f"{folder.name}.lock"):
        yield


def fill_once(folder: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """`folder`, filled by `build(tmp)` unless `folder/marker` exists already.

    `build` writes its files (`marker` among them) into the empty folder it is given;
    they are moved into `folder` one by one with `os.replace`, `marker` last.
    """
    folder = Path(folder)
    if (folder / marker).is_file():
        return folder
    with locked(folder):
        if (folder / marker).is_file():  # another process built it while we waited
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            build(tmp)
            names = sorted(os.listdir(tmp), key=lambda name: name == marker)  # marker last
            if marker not in names:
                raise RuntimeError(f"building {folder} did not write {marker}")
            folder.mkdir(exist_ok=True)
            for name in names:
                os.replace(tmp / name, folder / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (a cache miss)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: Path, value: Any) -> None:
    """Write `path` atomically (temporary name + os.replace), creating its folder."""
    write_atomic_text(path, json.dumps(value, sort_keys=True))
