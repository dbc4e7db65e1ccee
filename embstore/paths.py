"""Where a store's files live, where the per-user cache lives, and locking files between
processes. A leaf: no embstore imports."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

MANIFEST_NAME = "manifest.db"
ARRAYS_NAME = "embeddings.zarr"
CACHE_NAME = "cache"


@dataclass(frozen=True)
class StorePaths:
    """The layout of one store folder: `manifest.db`, `embeddings.zarr/`, `cache/`."""

    root: Path

    @classmethod
    def of(cls, root: str | os.PathLike) -> "StorePaths":
        return cls(Path(root).expanduser().absolute())

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def arrays(self) -> Path:
        return self.root / ARRAYS_NAME

    @property
    def cache(self) -> Path:
        """Derived data (normalised rows...): deleting it is always safe."""
        return self.root / CACHE_NAME

    def lock(self, name: str) -> Path:
        return self.root / f".{name}.lock"


def user_cache_dir() -> Path:
    """Per-user cache shared by every store (model exports, compiled models):
    `$EMBSTORE_CACHE`, else `$XDG_CACHE_HOME/embstore`, else `~/.cache/embstore`."""
    explicit = os.environ.get("EMBSTORE_CACHE")
    if explicit:
        return Path(explicit).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).absolute() / "embstore"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if needed) between processes."""
    import fcntl

    with open(path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on an existing folder itself, between processes: no
    lock file is left among what the folder holds (an export's files, say)."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_atomic(path: str | os.PathLike, data: bytes, durable: bool = False) -> None:
    """Write a whole file or nothing: a reader (or a crash) never sees half of it, and
    concurrent writers of the same path each replace it whole. O_NOFOLLOW: never write
    through a symlink planted at the temporary name. `durable`: the bytes reach the disk
    before the rename, so a power cut leaves the old file or the new one, never an empty
    one (the caller fsyncs the folder when the rename itself must survive)."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic_text(path: str | os.PathLike, text: str, durable: bool = False) -> None:
    """`write_atomic` of UTF-8 text, creating the folder first."""
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    write_atomic(path, text.encode("utf-8"), durable)
