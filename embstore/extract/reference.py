"""Embedding as the store did: the one place that opens a model for its stored rows and
embeds a file the way a worker embedded its items.

`load_checked` is what every encoder that makes or matches stored rows goes through (the
workers, `verify --deep`, `similar --audio`): the spec loaded, then refused when its
fingerprint is not the one the rows were made with (its files changed since).
`open_encoder_for` does that for a model record, in the precision the rows were computed
in; `ReferenceEmbedder` (and `embed_as_stored` for one file) cuts and embeds files with
the record's cutting."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from embstore.errors import ExtractionError
from embstore.manifest.registry import ModelRecord
from embstore.models.base import Encoder, untrimmed_fingerprint
from embstore.models.registry import load
from embstore.segments.policy import cutting_of_model

if TYPE_CHECKING:
    from embstore.segments.policy import Cutting


def load_checked(
    spec: str, fingerprint: str | None, device: str = "cpu", dtype: str = "fp32", threads: int | None = None
) -> Encoder:
    """The encoder `spec` names on `device`; ExtractionError when `fingerprint` (the rows'
    own, trimmed or not; None: not checked) is not the one it loads with. `threads` goes
    to the runtimes that take it (ONNX Runtime, OpenVINO)."""
    options = {} if threads is None else {"threads": threads}
    encoder = load(spec, device=device, dtype=dtype, **options)
    if fingerprint is not None and encoder.fingerprint != untrimmed_fingerprint(fingerprint):
        raise ExtractionError(
            f"{spec} now loads with fingerprint {encoder.fingerprint[:12]}, but the store's rows were made with"
            f" {fingerprint[:12]} (the model's files changed since): its embeddings are not comparable with them"
        )
    return encoder


def open_encoder_for(record: ModelRecord, device: str = "cpu") -> Encoder:
    """The model whose rows `record` describes, in the precision they were computed in;
    ExtractionError when the spec now loads other weights."""
    return load_checked(record.spec, record.fingerprint, device=device, dtype=record.compute_dtype)


class ReferenceEmbedder:
    """A store's model opened once to embed files as its rows were made: the record's
    spec and precision, its fingerprint checked, its cutting."""

    def __init__(self, record: ModelRecord, device: str = "cpu"):
        self.record = record
        self.encoder = open_encoder_for(record, device)
        # one Cutting for every file: its window embedder is made once
        self.cutting: Cutting | None = cutting_of_model(record.frontend)

    def embed(self, path: str | os.PathLike, start: float | None = None, end: float | None = None) -> np.ndarray:
        """float32 [n, dim]: `path` (or its [start, end) span) embedded as the store
        embedded its items: one vector for a whole-item model, one per window that
        embeds for a window model (a block of windows that runs out of device memory is
        embedded in halves, as the workers do). ItemCutFailed when the cutting leaves
        nothing to embed."""
        if self.cutting is None:
            return np.asarray(self.encoder.embed_file(str(path), start, end), dtype=np.float32).reshape(1, -1)
        vectors, _ = self.cutting.embed(self.encoder, self.encoder.load(str(path), start, end))
        return vectors


def embed_as_stored(
    record: ModelRecord, path: str | os.PathLike, start: float | None = None, end: float | None = None
) -> np.ndarray:
    """One file embedded as the store embedded its items (see `ReferenceEmbedder.embed`)."""
    return ReferenceEmbedder(record).embed(path, start, end)
