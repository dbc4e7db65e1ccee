"""How a run cuts each item before the model: speech only (`--vad`), or windows
through time (`--windows WINDOW:SHIFT`, inside the VAD's speech).

`Cutting` is the one place that knows it. The plan asks it what the run's model is
(its own fingerprint, name and kind, so a store holds whole-item rows, speech-only rows
and window rows of one network side by side); loaders ask it to cut one decoded
waveform (`cut`), the compute side to embed the windows (`embedder`).

Per item:
- the VAD's regions come from the store when a run or another model found them before
  (`speech` table, keyed by `vad_key`), else from the VAD, and travel back with the
  result to be stored;
- no speech: the item fails at stage "vad" with that reason;
- speech only: the samples inside the regions, concatenated, are the item's audio;
- windows: `embstore.segments.windows.windows_in_regions` (WeSpeaker's subsegment policy: the
  last window of a region is kept when longer than window - shift; a region shorter
  than a window gives one short window). An item with less than half a window of
  speech in all fails ("shorter than one window"); one with more but less than a window
  gets one short window.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from embstore.errors import ItemCutFailed, NoSpeech
from embstore.models.base import Encoder, variant_fingerprint
from embstore.vectors import finite_nonzero
from embstore.segments.vad import Region, VadConfig, speech_only, speech_regions, vad_config
from embstore.segments.window_embed import DEFAULT_BATCH, WindowEmbedder, window_mode
from embstore.segments.windows import WindowPlan, WindowSpec, parse_window_spec, windows_in_regions

# items with at most this many windows get their window features on the loader
# threads; longer ones (a one-hour file is ~4800 windows) are featurised block by block
# on the compute side, so memory stays flat
EAGER_WINDOWS = 512


@dataclass
class CutItem:
    """One decoded item after cutting: its audio (speech only, or whole), and for a
    window model its windows; `speech` is (VAD key, regions) when the VAD ran here."""

    wav: np.ndarray
    plan: WindowPlan | None = None
    speech: tuple[str, list[Region]] | None = None


class Cutting:
    """The cutting of one run: a VAD method (maybe "none") and maybe a window spec."""

    def __init__(self, vad: str = "none", windows: str | WindowSpec | None = None):
        self.vad: VadConfig = vad_config(vad)
        self.spec: WindowSpec | None = parse_window_spec(windows) if windows is not None else None
        self._embedder: WindowEmbedder | None = None
        self.mode = "auto"  # how windows are embedded (a model's record says which)

    @property
    def active(self) -> bool:
        """Whether the run's rows differ from plain whole-item rows at all."""
        return self.spec is not None or self.vad.method != "none"

    @property
    def windowed(self) -> bool:
        return self.spec is not None

    @property
    def vad_key(self) -> str:
        """The stored regions' key: the method and a hash of every setting (and silero's
        version), so regions of other settings are never reused."""
        settings = json.dumps(self.vad.as_dict(), sort_keys=True)
        return f"{self.vad.method}-{hashlib.blake2b(settings.encode(), digest_size=6).hexdigest()}"

    # -- the plan's side ------------------------------------------------------------

    def describe(self, frontend: dict[str, Any], runtime: str) -> dict[str, Any]:
        """What changes the rows, for the model's frontend record and fingerprint."""
        out: dict[str, Any] = {"vad": self.vad.as_dict()}
        if self.spec is not None:
            out["windows"] = self.spec.as_dict()
            out["window_embedding"] = window_mode(frontend, runtime)
        return out

    def label(self) -> str:
        """The cutting as users name it: `w1.5:0.75+silero`, `silero`."""
        parts = [f"w{self.spec}"] if self.spec is not None else []
        if self.vad.method != "none":
            parts.append(self.vad.method)
        return "+".join(parts) or "whole"

    def model_description(self, description: dict[str, Any], runtime: str) -> dict[str, Any]:
        """The run's model: the encoder's description with the cutting in its frontend,
        its fingerprint, its name and its kind."""
        if not self.active:
            return description
        cut = self.describe(description["frontend"], runtime)
        digest = hashlib.blake2b(json.dumps(cut, sort_keys=True).encode(), digest_size=6).hexdigest()
        return dict(
            description,
            name=f"{description['name']}+{self.label()}",
            frontend=dict(description["frontend"], cutting=cut),
            fingerprint=variant_fingerprint(description["fingerprint"], ("win" if self.windowed else "vad") + digest),
            kind="windows" if self.windowed else "item",
        )

    # -- the workers' side ------------------------------------------------------------

    def embedder(self, encoder: Encoder, mode: str | None = None, batch: int = DEFAULT_BATCH) -> WindowEmbedder:
        """The windows' embedder for this encoder, made on first use (later calls get it)."""
        if self._embedder is None or self._embedder.encoder is not encoder:
            self._embedder = WindowEmbedder(encoder, mode=mode or self.mode, batch=batch)
        return self._embedder

    def embed(self, encoder: Encoder, wav: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One item as a worker embeds it, all at once: (vectors [n, dim], the windows'
        (start, end) seconds [n, 2], or None for a whole item); for `verify --deep` and
        queries by audio. ItemCutFailed when the item has nothing to embed."""
        cut = self.cut(encoder, wav)
        if cut.plan is None:
            feats = encoder.features(cut.wav)
            return np.asarray(encoder.embed_batch([feats]), dtype=np.float32).reshape(1, -1), None
        vectors = self.embedder(encoder).embed(cut.wav, cut.plan)
        keep = finite_nonzero(vectors)
        times = np.stack([cut.plan.starts, cut.plan.ends], axis=1)
        return vectors[keep], times[keep]

    def cut(self, encoder: Encoder, wav: np.ndarray, known: list[Region] | None = None) -> CutItem:
        """One decoded, non-silent waveform cut for the model; ItemCutFailed says why not."""
        rate = encoder.sample_rate
        duration = len(wav) / rate
        speech = None
        if self.vad.method == "none":
            regions: list[Region] = [(0.0, duration)]
        elif known is not None:
            regions = known
        else:
            try:
                regions = speech_regions(wav, rate, self.vad)
            except NoSpeech as exc:
                raise ItemCutFailed("vad", str(exc)) from None
            speech = (self.vad_key, regions)
        if not regions:
            raise ItemCutFailed("vad", f"no speech found by the {self.vad.method} VAD")
        if self.spec is None:
            try:
                return CutItem(speech_only(wav, rate, regions, self.vad.method), None, speech)
            except NoSpeech as exc:
                raise ItemCutFailed("vad", str(exc)) from None
        spoken = sum(min(b, duration) - max(a, 0.0) for a, b in regions if min(b, duration) > max(a, 0.0))
        if spoken < self.spec.window / 2:
            raise ItemCutFailed(
                "windows", f"shorter than one window: {spoken:.2f} s of speech, a window needs at least"
                f" {self.spec.window / 2:g} s (half of {self.spec.window:g} s)",
            )
        plan = windows_in_regions(regions, self.spec.window, self.spec.shift, duration)
        return CutItem(wav, plan, speech)

    def window_pieces(self, encoder: Encoder, wav: np.ndarray, plan: WindowPlan, first: int = 0,
                      count: int | None = None) -> list[np.ndarray]:
        """The samples of windows [first, first + count) of an item."""
        ranges = self.embedder(encoder).sample_ranges(plan, len(wav))
        stop = len(plan) if count is None else min(len(plan), first + count)
        return [wav[a:b] for a, b in ranges[first:stop]]


def cutting_of_model(frontend: dict[str, Any]) -> Cutting | None:
    """The cutting a model's rows were made with, from its frontend record
    (`ModelRecord.frontend`), or None for whole items."""
    cut = frontend.get("cutting")
    if not cut:
        return None
    settings = {k: v for k, v in cut["vad"].items() if k != "model"}
    cutting = Cutting()
    cutting.vad = VadConfig(**settings)
    if cut.get("windows"):
        cutting.spec = WindowSpec(float(cut["windows"]["window"]), float(cut["windows"]["shift"]))
        cutting.mode = cut.get("window_embedding", {}).get("mode", "auto")
    return cutting


def cutting_of(vad: str, windows: str | None) -> Cutting | None:
    """The run's cutting, or None for plain whole items (nothing to cut)."""
    cutting = Cutting(vad, windows)
    return cutting if cutting.active else None
