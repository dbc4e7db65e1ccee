"""Writing export files safely: sanitised names, nothing outside OUT (atomic writes:
`embstore.paths.write_atomic`)."""

from __future__ import annotations

import hashlib
import os
import re

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
