"""`scan --hf`: the rows of a Hugging Face audio dataset as scan candidates.

Each row is a file row of its own, addressed `SHARD#row=N` (`embstore.audio.io`), with
its shard's size and mtime and the header read from its bytes; a shard is one "folder"
of the sync. A shard whose size and mtime are what the manifest recorded is not read at
all on a rescan. Rows are read a row group at a time. A shard that cannot be read (cut
short, not Parquet) is one failure with its reason; a row whose bytes are not audio is
one failure too; the other rows and shards go on.

Each row carries the content hash of its bytes, so an id that moved to another row or
shard (a re-sharded dataset) keeps its item and, with the same bytes, its embeddings.
The id/speaker columns and the dataset name are recorded per dataset (`Mapping`): a
rescan naming other ones rereads every shard and applies them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from embstore.audio.io import bytes_hash, probe_bytes, row_address
from embstore.errors import AudioError, ScanError
from embstore.interop.hf import Row, dataset_name, detect_columns, iter_rows, shard_schema
from embstore.models.common import short_error
from embstore.scan.sources import Candidate


@dataclass
class RowCandidate(Candidate):
    """A dataset row, with the content hash of its audio bytes (what extraction would
    compute): a rescan knows a row that moved, or was renamed, holds the same audio and
    keeps its embedding."""

    content_hash: str | None = None


@dataclass(frozen=True)
class Mapping:
    """How a dataset's rows become items: the id and speaker columns given (None: found
    by the usual names) and the dataset name. Recorded per dataset (the root's `layout`,
    as JSON, and `dataset`): a rescan naming none of them keeps them; one changing any
    rereads every shard, unchanged or not, and applies it."""

    id_column: str | None
    speaker_column: str | None
    dataset: str

    def layout(self) -> str:
        """The root's `layout` value."""
        return json.dumps({"id_column": self.id_column, "speaker_column": self.speaker_column}, sort_keys=True)


def applying(layout: str) -> str:
    """A root's `layout` while a scan applies it: a scan cut short leaves the next one
    rereading every shard."""
    return json.dumps(dict(json.loads(layout), applying=True), sort_keys=True)


def dataset_mapping(path: str, recorded: Any, id_column: str | None, speaker_column: str | None,
                    dataset: str | None) -> tuple[Mapping, bool]:
    """(the mapping a scan of the dataset at `path` uses, whether every shard must be
    reread to apply it); `recorded`: the root's (layout, dataset), None for a new one.
    Options given win; those not given are as recorded."""
    try:
        before = json.loads(recorded[0]) if recorded is not None and recorded[0] else {}
    except ValueError:
        before = {}
    if not isinstance(before, dict):
        before = {}
    old = Mapping(before.get("id_column"), before.get("speaker_column"),
                  (recorded[1] if recorded is not None else None) or dataset_name(path))
    mapping = Mapping(id_column or old.id_column, speaker_column or old.speaker_column, dataset or old.dataset)
    return mapping, recorded is not None and (mapping != old or bool(before.get("applying")))


def shard_stem(shard: str, root: str) -> str:
    """A shard's path below the dataset's root without its extension: the prefix of its
    rows' default ids. `save_to_disk` names every split's shard data-00000-of-0000N.arrow,
    so the file name alone would give train/ and test/ the same ids."""
    base = root if os.path.isdir(root) else os.path.dirname(root)
    return os.path.splitext(os.path.relpath(shard, base))[0].replace(os.sep, "/")


def _candidate(shard: str, row: Row, size: int, mtime_ns: int, dataset: str, stem: str) -> RowCandidate:
    address = row_address(shard, row.index)
    uid = row.id if row.id is not None else f"{stem}/{row.index}"
    cand = RowCandidate(address, address, size, mtime_ns, row.dataset or dataset, row.speaker or "unknown", uid,
                        dir=shard)
    if row.audio is None:
        cand.error = "no audio bytes in the row (null)"
        return cand
    cand.content_hash = bytes_hash(row.audio)
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
