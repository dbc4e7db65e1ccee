"""embstore: speaker embeddings for large speech corpora, exactly once, into a queryable store."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.2.0"

if TYPE_CHECKING:
    from embstore.store import Store


def open(path: str, create: bool = True) -> "Store":  # noqa: A001 - mirrors sqlite_utils.Database
    """Open (creating or upgrading as needed) the store at `path`."""
    # imported on use: the Store pulls in sqlite-utils, zarr and NumPy, and `import
    # embstore` (the CLI's `--help`) must stay light
    from embstore.store import Store

    return Store(path, create=create)


__all__ = ["open", "__version__"]
