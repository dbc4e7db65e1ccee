"""What a worker checks on its node before its first claim, and how it names the node.
Pure functions: no Ray, no store.

A node that mounts the data elsewhere is told so with `--path-map OLD=NEW`: on every
node where a scan root under OLD does not exist, the same path under NEW is used
instead (when that exists). Model directories named by the spec (`wespeaker:DIR`)
follow the same map.
"""

from __future__ import annotations

import os
from typing import Sequence

Pairs = Sequence[tuple[str, str]]


def node_name(node_id: str, node_ip: str) -> str:
    """How messages name a node: its address and the start of its Ray id."""
    return f"node {node_ip} ({node_id[:8]})"


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def mapped(path: str, pairs: Pairs) -> str | None:
    """`path` rewritten by the first (most specific) OLD=NEW pair it lies under."""
    for old, new in pairs:
        if _under(path, old):
            return new.rstrip("/") + path[len(old.rstrip("/")):] if old != "/" else new.rstrip("/") + path
    return None


def resolve_roots(roots: Sequence[str], pairs: Pairs) -> tuple[list[tuple[str, str]], list[str]]:
    """(rewrites root -> where it is on this node, roots missing here). A root that
    exists is used as it is; a map is used only where the original is missing."""
    rewrites, missing = [], []
    for root in roots:
        if os.path.exists(root):
            continue
        target = mapped(root, pairs)
        if target is not None and os.path.exists(target):
            rewrites.append((root, target))
        else:
            missing.append(root)
    rewrites.sort(key=lambda p: -len(p[0]))
    return rewrites, missing


def local_spec(spec: str, pairs: Pairs) -> str:
    """A model spec whose directory or file is mapped where this node lacks it."""
    kind, sep, target = spec.partition(":")
    if not sep or not target.startswith("/") or os.path.exists(target):
        return spec
    moved = mapped(target, pairs)
    return f"{kind}:{moved}" if moved is not None and os.path.exists(moved) else spec


def missing_roots_line(node: str, missing: Sequence[str]) -> str:
    """The one line a worker refuses with when scan roots are not on its node."""
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return (f"{node}: scan root(s) missing there: {shown} "
            f"(mount them, or say where they are with --path-map {missing[0]}=PATH)")
