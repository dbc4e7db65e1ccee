"""Writing export files safely: atomic replaces, sanitised names, nothing outside OUT."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading

from embstore.errors import StoreError

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


def inside(out_real: str, rel_dir: str) -> str:
    """The real directory for `rel_dir` below OUT; refuses one that resolves outside it."""
    target = os.path.realpath(os.path.join(out_real, rel_dir))
    if target != out_real and not target.startswith(out_real + os.sep):
        raise StoreError(f"refusing to write into {rel_dir!r}: it resolves to {target}, outside {out_real}")
    return target


def write_atomic(path: str, data: bytes) -> None:
    # a reader (or a crash) never sees half a file; O_NOFOLLOW: never write through a link
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
