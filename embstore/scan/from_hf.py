"""`scan --hf`: the rows of a Hugging Face audio dataset as scan candidates.

Each row is a file row of its own, addressed `SHARD#row=N` (`embstore.audio.io`), with
its shard's size and mtime and the header read from its bytes; a shard is one "folder"
of the sync. A shard whose size and mtime are what the manifest recorded is not read at
all on a rescan. Rows are read a row group at a time. A shard that cannot be read (cut
short, not Parquet) is one failure with its reason; a row whose bytes are not audio is
one failure too; the other rows and shards go on.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

from embstore.audio.io import probe_bytes, row_address
from embstore.errors import AudioError, ScanError
from embstore.interop.hf import Row, detect_columns, iter_rows, shard_schema
from embstore.models.common import short_error
from embstore.scan.sources import Candidate


def shard_stem(shard: str, root: str) -> str:
    """A shard's path below the dataset's root without its extension: the prefix of its
    rows' default ids. `save_to_disk` names every split's shard data-00000-of-0000N.arrow,
    so the file name alone would give train/ and test/ the same ids."""
    base = root if os.path.isdir(root) else os.path.dirname(root)
    return os.path.splitext(os.path.relpath(shard, base))[0].replace(os.sep, "/")


def _candidate(shard: str, row: Row, size: int, mtime_ns: int, dataset: str, stem: str) -> Candidate:
    address = row_address(shard, row.index)
    uid = row.id if row.id is not None else f"{stem}/{row.index}"
    cand = Candidate(address, address, size, mtime_ns, row.dataset or dataset, row.speaker or "unknown", uid,
                     dir=shard)
    if row.audio is None:
        cand.error = "no audio bytes in the row (null)"
        return cand
    try:
        info = probe_bytes(row.audio)
        cand.header = (info.sample_rate, info.channels, info.frames, info.duration, info.subtype)
    except AudioError as exc:
        cand.error = str(exc)
    except Exception as exc:  # a header parser bug fails the row, not the scan
        cand.error = f"unreadable header: {type(exc).__name__}: {exc}"
    return cand


def check_columns(shards: list[str], id_column: str | None, speaker_column: str | None) -> None:
    """A ScanError, before anything is written, when a column asked for is missing from
    a shard (even one unchanged since the last scan); unreadable shards fail later, alone."""
    if id_column is None and speaker_column is None:
        return
    for shard in shards:
        try:
            schema = shard_schema(shard)
        except Exception:
            continue
        try:
            detect_columns(schema, id_column, speaker_column)
        except AudioError:
            continue
        except ScanError as exc:
            raise ScanError(f"{shard}: {exc}") from None


def hf_candidates(
    root: str, shards: list[str], dataset: str, unchanged: Callable[[str, int, int], bool],
    id_column: str | None = None, speaker_column: str | None = None,
) -> Iterator[tuple[str, list[Candidate] | None]]:
    """(shard, its rows) per shard of the dataset at `root`; (shard, None) for a shard
    unchanged since the last scan (`unchanged(shard, size, mtime_ns)`), whose rows stay as
    they are. Rows without an id column are `<shard below root>/<row>`."""
    for shard in shards:
        try:
            st = os.stat(shard)
        except OSError as exc:
            yield shard, [Candidate(shard, shard, -1, -1, dataset, "unknown", shard, dir=shard,
                                    error=f"cannot stat: {exc.strerror}")]
            continue
        if unchanged(shard, st.st_size, st.st_mtime_ns):
            yield shard, None
            continue
        stem = shard_stem(shard, root)
        try:
            columns = detect_columns(shard_schema(shard), id_column, speaker_column)
            rows = [_candidate(shard, r, st.st_size, st.st_mtime_ns, dataset, stem)
                    for group in iter_rows(shard, columns) for r in group]
        except ScanError:
            raise  # a column asked for that is not there: the user's to fix, not the shard's
        except Exception as exc:  # pyarrow's errors on a cut or foreign file, a missing column
            yield shard, [Candidate(shard, shard, st.st_size, st.st_mtime_ns, dataset, "unknown", shard, dir=shard,
                                    error=f"unreadable dataset shard: {short_error(exc)}")]
            continue
        yield shard, rows
