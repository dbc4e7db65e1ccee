"""Diarization of one waveform without a store: VAD -> windows -> embeddings -> speakers.

The steps are separate functions so that the store-backed `embstore diarize` can run
the same code on windows it already holds:

    regions  = speech_regions(wav, sr, vad)                  # embstore.segments.vad
    plan     = windows_in_regions(regions, window, shift, duration)   # embstore.segments.windows
    matrix   = WindowEmbedder(encoder).embed(wav, plan)      # embstore.segments.window_embed
    segments = diarize_windows(plan.starts, plan.ends, matrix, ...)   # here

`diarize_audio` chains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from embstore.audio.io import resample
from embstore.diarize.speakers import check_speaker_counts, cluster_windows
from embstore.diarize.rttm import Segment, windows_to_segments
from embstore.models.base import Encoder
from embstore.models.thresholds import thresholds_for
from embstore.errors import NoSpeech
from embstore.segments.vad import Region, VadConfig, speech_regions, vad_config
from embstore.vectors import finite_nonzero
from embstore.segments.window_embed import WindowEmbedder
from embstore.segments.windows import (
    WindowPlan,
    WindowSpec,
    parse_window_spec,
    windows_in_regions,
)

__all__ = ["Diarization", "NoSpeech", "diarize_audio", "diarize_windows"]


@dataclass
class Diarization:
    """Everything one item's diarization computed (what a store would keep)."""

    regions: list[Region]
    plan: WindowPlan
    embeddings: np.ndarray  # [len(plan), dim], NaN rows for windows the encoder could not embed
    labels: np.ndarray  # [len(plan)] int32, -1 for those windows
    segments: list[Segment]

    @property
    def num_speakers(self) -> int:
        return len({s.speaker for s in self.segments})


def diarize_windows(
    starts: np.ndarray,
    ends: np.ndarray,
    embeddings: np.ndarray,
    method: str = "spectral",
    num_speakers: int | None = None,
    max_speakers: int | None = None,
    **cluster_options: Any,
) -> tuple[np.ndarray, list[Segment]]:
    """(labels with -1 for unusable rows, merged segments) of one item's windows."""
    check_speaker_counts(num_speakers, max_speakers)
    embeddings = np.asarray(embeddings)
    valid = finite_nonzero(embeddings) if len(embeddings) else np.zeros(0, dtype=bool)
    labels = np.full(len(embeddings), -1, dtype=np.int32)
    if not valid.any():
        return labels, []
    labels[valid] = cluster_windows(
        embeddings[valid], method=method, num_speakers=num_speakers, max_speakers=max_speakers, **cluster_options
    )
    starts, ends = np.asarray(starts), np.asarray(ends)
    return labels, windows_to_segments(starts[valid], ends[valid], labels[valid])


def diarize_audio(
    wav: np.ndarray,
    sample_rate: int,
    encoder: Encoder,
    vad: str | VadConfig = "silero",
    window: str | WindowSpec = "1.5:0.75",
    num_speakers: int | None = None,
    max_speakers: int | None = None,
    method: str = "spectral",
    embedder: WindowEmbedder | None = None,
    detailed: bool = False,
    **cluster_options: Any,
) -> list[Segment] | Diarization:
    """Speaker segments of one mono waveform (a `Diarization` with `detailed=True`).

    `NoSpeech` when the VAD finds no speech or no window can be embedded.
    """
    spec = parse_window_spec(window)
    config = vad_config(vad)
    check_speaker_counts(num_speakers, max_speakers)
    wav = resample(np.asarray(wav, dtype=np.float32), sample_rate, encoder.sample_rate)
    duration = len(wav) / encoder.sample_rate
    regions = speech_regions(wav, encoder.sample_rate, config)
    if not regions:
        raise NoSpeech(f"no speech found by the {config.method} VAD")
    plan = windows_in_regions(regions, spec.window, spec.shift, duration)
    embedder = embedder or WindowEmbedder(encoder)
    matrix = embedder.embed(wav, plan)
    if method == "ahc" and "threshold" not in cluster_options:
        cluster_options["threshold"] = thresholds_for(encoder.name).diarize_ahc  # a cosine cut is the model's own
    labels, segments = diarize_windows(
        plan.starts, plan.ends, matrix, method, num_speakers, max_speakers, **cluster_options
    )
    if not segments:
        raise NoSpeech(f"none of the {len(plan)} speech windows could be embedded")
    if detailed:
        return Diarization(regions, plan, matrix, labels, segments)
    return segments
