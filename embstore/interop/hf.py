"""Hugging Face audio datasets: shards, columns, rows; and the embeddings' Parquet schema.

An HF audio column is Arrow `struct<bytes: binary, path: string>`; `datasets` records its
feature types as JSON in the schema metadata under `huggingface`. A dataset on disk is a
Parquet file, a folder of Parquet shards (the Hub's layout), or a `save_to_disk` folder
of Arrow IPC stream files (`data-00000-of-00002.arrow`, one folder per split).

Rows are read one row group (Parquet) or record batch (Arrow) at a time, so a scan holds
one group's audio in memory, never a shard's.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from embstore.audio.io import dataset_audio_column
from embstore.errors import ScanError
from embstore.interop import need

# the names datasets in the wild use, most specific first
ID_COLUMNS = ("id", "utt_id", "utterance_id", "segment_id", "audio_id", "key", "file_id")
SPEAKER_COLUMNS = ("speaker_id", "speaker", "client_id", "spk_id", "spk", "speaker_name")
DATASET_COLUMNS = ("dataset", "corpus")
SHARD_EXTENSIONS = (".parquet", ".arrow")
_SHARD_SUFFIX = re.compile(r"([-_.]?\d{5}[-_]of[-_]\d{5})$")


def find_shards(path: str) -> list[str]:
    """The dataset's shards, absolute and sorted: the file itself, or every Parquet/Arrow
    file below the folder (a `save_to_disk` DatasetDict keeps one folder per split).
    Hidden files and `datasets` cache files are skipped."""
    need("pyarrow", "parquet", "reading Hugging Face datasets")
    path = os.path.abspath(path)
    if os.path.isfile(path):
        if not path.endswith(SHARD_EXTENSIONS):
            raise ScanError(f"{path}: not a Parquet or Arrow file (.parquet, .arrow)")
        return [path]
    if not os.path.isdir(path):
        raise ScanError(f"{path}: no such file or folder")
    found = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(folder, f) for f in files
                     if f.endswith(SHARD_EXTENSIONS) and not f.startswith((".", "cache-")))
    if not found:
        raise ScanError(f"{path}: no .parquet or .arrow shards in it")
    return sorted(found)


def dataset_name(path: str) -> str:
    """A dataset name from the path given: the folder's name, or the file's stem without
    its shard numbering (`train-00000-of-00002.parquet` -> `train`)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return os.path.basename(os.path.normpath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    return _SHARD_SUFFIX.sub("", stem) or stem


@dataclass(frozen=True)
class Columns:
    """Which columns of a shard hold the audio, the item id, the speaker and the dataset
    (None: not in it)."""

    audio: str
    id: str | None
    speaker: str | None
    dataset: str | None

    @property
    def read(self) -> list[str]:
        return [c for c in (self.audio, self.id, self.speaker, self.dataset) if c is not None]


def detect_columns(schema: Any, id_column: str | None = None, speaker_column: str | None = None) -> Columns:
    """The columns of `schema` by the usual names, or as given (a given name that is not
    there is a ScanError, the scan's: a typo must not silently give every item speaker
    'unknown')."""
    names = list(schema.names)
    audio = dataset_audio_column(schema)  # AudioError: this shard has none
    for given, what in ((id_column, "--id-column"), (speaker_column, "--speaker-column")):
        if given is not None and given not in names:
            raise ScanError(f"{what} {given!r} is not a column (columns: {', '.join(names)})")

    def first(candidates: Sequence[str]) -> str | None:
        return next((c for c in candidates if c in names and c != audio), None)

    return Columns(audio, id_column or first(ID_COLUMNS), speaker_column or first(SPEAKER_COLUMNS),
                   first(DATASET_COLUMNS))


@dataclass
class Row:
    """One row as a scan needs it: its index in the shard, id/speaker/dataset (None when
    the column is missing or empty) and its encoded audio (None: null)."""

    index: int
    id: str | None
    speaker: str | None
    dataset: str | None
    audio: bytes | None


def shard_schema(shard: str) -> Any:
    """The Arrow schema of a shard (reads its footer or first message only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if shard.endswith(".parquet"):
        return pq.read_schema(shard)
    with pa.memory_map(shard) as source:
        try:
            return pa.ipc.open_stream(source).schema
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).schema


def _groups(shard: str, columns: list[str]) -> Iterator[Any]:
    """The shard's tables/record batches, one row group or batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if shard.endswith(".parquet"):
        pf = pq.ParquetFile(shard)
        for g in range(pf.metadata.num_row_groups):
            yield pf.read_row_group(g, columns=columns)
        return
    with pa.memory_map(shard) as source:
        try:
            reader: Any = pa.ipc.open_stream(source)
            batches: Iterator[Any] = iter(reader)
        except pa.ArrowInvalid:
            ipc_file = pa.ipc.open_file(source)
            batches = (ipc_file.get_batch(i) for i in range(ipc_file.num_record_batches))
        for batch in batches:
            yield batch.select(columns)


def iter_rows(shard: str, columns: Columns) -> Iterator[list[Row]]:
    """The shard's rows, a row group at a time (only the columns named). pyarrow's
    errors (a truncated shard...) propagate: the caller fails the shard."""
    index = 0
    for group in _groups(shard, columns.read):
        audio = group.column(columns.audio)
        audio = (audio.combine_chunks() if hasattr(audio, "combine_chunks") else audio).field("bytes").to_pylist()

        def text(column: str | None) -> list[str | None]:
            if column is None:
                return [None] * group.num_rows
            return [None if v is None or str(v) == "" else str(v) for v in group.column(column).to_pylist()]

        ids, speakers, datasets = text(columns.id), text(columns.speaker), text(columns.dataset)
        yield [Row(index + k, ids[k], speakers[k], datasets[k], audio[k]) for k in range(group.num_rows)]
        index += group.num_rows


# -- the embeddings' Parquet schema -------------------------------------------------------


def embedding_schema(dim: int, cluster: bool, windows: bool, info: dict[str, Any]) -> Any:
    """The export's Arrow schema: id, speaker, dataset, path, start, end, embedding as
    fixed_size_list<float32>[dim], cluster (when set), item (window models); `info`
    (model, fingerprint...) under the metadata key `embstore`, and the `datasets`
    feature types under `huggingface` so `Dataset.from_parquet` types every column."""
    need("pyarrow", "parquet", "writing Parquet")
    import pyarrow as pa

    fields = [
        ("id", pa.string(), "string"), ("speaker", pa.string(), "string"), ("dataset", pa.string(), "string"),
        ("path", pa.string(), "string"), ("start", pa.float64(), "float64"), ("end", pa.float64(), "float64"),
    ]
    if windows:
        fields.append(("item", pa.string(), "string"))
    if cluster:
        fields.append(("cluster", pa.string(), "string"))
    schema = pa.schema([pa.field(n, t) for n, t, _ in fields] + [pa.field("embedding", pa.list_(pa.float32(), dim))])
    features: dict[str, Any] = {n: {"dtype": d, "_type": "Value"} for n, _, d in fields}
    # "Sequence" with a length: a fixed-length float32 list in every `datasets` release
    features["embedding"] = {"feature": {"dtype": "float32", "_type": "Value"}, "length": dim, "_type": "Sequence"}
    return schema.with_metadata({
        "huggingface": json.dumps({"info": {"features": features}}),
        "embstore": json.dumps(info),
    })


def embedding_table(schema: Any, columns: dict[str, Any], vectors: Any) -> Any:
    """One table of `schema` from plain column lists and a float32 [n, dim] matrix."""
    import numpy as np
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = schema.field("embedding").type.list_size
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
    arrays = [pa.array(columns[f.name], f.type) for f in schema if f.name != "embedding"]
    return pa.Table.from_arrays([*arrays, embedding], schema=schema)
