"""Formats the field keeps its corpora and embeddings in, read and written here only.

lhotse  Lhotse manifests: the items a CutSet or RecordingSet (+ SupervisionSet) holds,
        and cuts carrying an `embedding` custom field (HDF5 via Lhotse's own writer)
hf      Hugging Face audio datasets (Parquet shards, `save_to_disk` Arrow folders): the
        shards, their columns, their rows a row group at a time; and the Parquet schema
        (with `datasets` feature metadata) that embeddings are exported in

Both sit below `scan` (which reads them) and `export` (which writes them); the heavy
libraries (lhotse, pyarrow) are imported inside the functions that need them.
"""

from __future__ import annotations


def need(module: str, extra: str, what: str) -> None:
    """A one-line StoreError, before any work, when an optional package is missing."""
    import importlib.util

    from embstore.errors import StoreError

    if importlib.util.find_spec(module) is None:
        raise StoreError(f"{what} needs {module}, which is not installed: pip install 'embstore[{extra}]'")
