"""Test and benchmark data, in one place: what the library never runs for users.

- `voice`: a crude voiced signal (harmonics, vibrato, syllable-like bursts) for tests and
  demos that need audio but not speech; `make_corpus`: a small tree of such voices (the
  demo's fallback without ../shared/data);
- synthetic conversations cut from real single-speaker utterances, with reference RTTM,
  for measuring diarization (DER) where no annotated conversations are available:

- `num_speakers` speakers are drawn from the corpus; the first turns go to each of
  them once (in random order), later turns to a random speaker other than the last
  one, until `duration` seconds are filled;
- each turn is a random `turn` = (2, 5) s span cut from a random utterance of its
  speaker, trimmed to its first and last loud frame (energy within 40 dB of the
  utterance's loudest 25 ms frame); spans are taken whole from one utterance;
- the reference marks each turn as speech except for its pauses of `pause` = 0.5 s
  or more (runs of frames that are not loud): shorter pauses stay inside a segment,
  as annotators keep them (and as md-eval/pyannote references usually do);
- every turn is scaled to the same speech level (-26 dBFS over its loud frames) with
  a random +-2 dB jitter, so the recording level of a source chapter is not a clue
  to who speaks;
- turns are separated by `gap` = (0.2, 0.8) s and the whole conversation sits on
  white noise at `noise_dbfs` (-60 dBFS): silence with a low noise floor;
- with `overlap` = p > 0, each turn after the first starts, with probability p,
  `overlap_seconds` = (0.3, 1.0) s before the previous turn ends instead (but never
  in its first half): both speakers talk at once there, and the reference has both.
  p = 0 (the default) gives no overlap and exactly the conversations of earlier
  versions for the same seed.

The reference is one segment per turn, exactly where its samples were placed.
Everything follows from `seed`: equal seeds give equal audio and references.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from embstore.audio.io import is_audio_name, load_for_model
from embstore.diarize.rttm import Segment

SAMPLE_RATE = 16000
_FRAME = 400  # 25 ms at 16 kHz
_TARGET_DBFS = -26.0


def voice(seconds: float, rate: int = 16000, pitch: float = 140.0, seed: int = 0) -> np.ndarray:
    """A crude voiced signal: harmonics with vibrato and syllable-like bursts, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = pitch * (1 + 0.05 * np.sin(2 * np.pi * 3 * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    sig = sum((0.6 / k) * np.sin(k * phase + rng.uniform(0, 6)) for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)) ** 2
    sig = sig * envelope + 0.01 * rng.standard_normal(len(t))
    return (0.3 * sig / np.max(np.abs(sig))).astype(np.float32)


def make_corpus(root: Path, speakers: int = 5, per_speaker: int = 4) -> Path:
    import soundfile as sf

    for s in range(speakers):
        for n in range(per_speaker):
            path = root / "synthetic" / f"spk{s}" / f"spk{s}-{n}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                sf.write(str(path), voice(2.0 + 0.7 * n, pitch=100 + 30 * s, seed=10 * s + n), 16000)
    return root


@dataclass
class Conversation:
    item: str
    wav: np.ndarray
    sample_rate: int
    reference: list[Segment]
    speakers: list[str] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return len(self.wav) / self.sample_rate


def corpus_by_speaker(root: str | os.PathLike[str]) -> dict[str, list[str]]:
    """{speaker: [audio paths]} of a dataset/speaker/file tree (LibriSpeech layout)."""
    out: dict[str, list[str]] = {}
    for speaker in sorted(os.listdir(root)):
        folder = os.path.join(root, speaker)
        if not os.path.isdir(folder):
            continue
        files = sorted(
            os.path.join(dirpath, name)
            for dirpath, _, names in os.walk(folder)
            for name in names
            if is_audio_name(name)
        )
        if files:
            out[speaker] = files
    return out


def _loud_frames(wav: np.ndarray) -> np.ndarray:
    frames = len(wav) // _FRAME
    energy = (wav[: frames * _FRAME].reshape(frames, _FRAME).astype(np.float64) ** 2).mean(axis=1)
    db = 10 * np.log10(energy + 1e-12)
    return db > db.max() - 40.0


class _Sources:
    """Decoded utterances, loaded once each (conversations reuse them)."""

    def __init__(self, corpus: Mapping[str, Sequence[str]]) -> None:
        self.corpus = corpus
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        if path not in self._cache:
            wav = load_for_model(path, SAMPLE_RATE)
            self._cache[path] = (wav, _loud_frames(wav))
        return self._cache[path]


def _speech_spans(piece: np.ndarray, pause: float) -> list[tuple[int, int]]:
    """Sample spans of `piece` split at its quiet runs of at least `pause` seconds."""
    loud = np.flatnonzero(_loud_frames(piece))
    min_gap = int(np.ceil(pause * SAMPLE_RATE / _FRAME))
    spans: list[tuple[int, int]] = []
    begin = prev = int(loud[0])
    for f in loud[1:].tolist():
        if f - prev - 1 >= min_gap:
            spans.append((begin * _FRAME, (prev + 1) * _FRAME))
            begin = f
        prev = f
    spans.append((begin * _FRAME, min((prev + 1) * _FRAME, len(piece))))
    return spans


def _cut_turn(
    sources: _Sources, speaker: str, rng: np.random.Generator, turn: tuple[float, float]
) -> np.ndarray:
    paths = sources.corpus[speaker]
    for _ in range(20):
        wav, loud = sources.get(paths[int(rng.integers(len(paths)))])
        loud_idx = np.flatnonzero(loud)
        if len(loud_idx) < 2:
            continue
        first, last = loud_idx[0] * _FRAME, (loud_idx[-1] + 1) * _FRAME
        length = int(rng.uniform(*turn) * SAMPLE_RATE)
        if last - first < int(turn[0] * SAMPLE_RATE):
            continue
        length = min(length, last - first)
        start = int(rng.integers(first, last - length + 1))
        piece = wav[start : start + length]
        # trim to the piece's own loud frames so the reference starts and ends on speech
        piece_loud = np.flatnonzero(_loud_frames(piece)) if len(piece) >= _FRAME else np.zeros(0, int)
        if len(piece_loud) == 0:
            continue
        piece = piece[piece_loud[0] * _FRAME : (piece_loud[-1] + 1) * _FRAME]
        if len(piece) >= int(turn[0] * SAMPLE_RATE * 0.75):
            return piece
    raise ValueError(f"speaker {speaker}: no utterance holds a {turn[0]:g} s stretch of speech")


def _level(piece: np.ndarray, dbfs: float) -> np.ndarray:
    frames = len(piece) // _FRAME
    loud = _loud_frames(piece)
    energy = (piece[: frames * _FRAME].reshape(frames, _FRAME).astype(np.float64) ** 2).mean(axis=1)[loud]
    rms = float(np.sqrt(energy.mean())) if len(energy) else float(np.sqrt(np.mean(piece**2)))
    gain = 10 ** (dbfs / 20) / max(rms, 1e-9)
    return np.clip(piece * gain, -1.0, 1.0).astype(np.float32)


def make_conversation(
    corpus: Mapping[str, Sequence[str]],
    num_speakers: int,
    seed: int,
    duration: float = 60.0,
    turn: tuple[float, float] = (2.0, 5.0),
    gap: tuple[float, float] = (0.2, 0.8),
    noise_dbfs: float = -60.0,
    pause: float = 0.5,
    overlap: float = 0.0,
    overlap_seconds: tuple[float, float] = (0.3, 1.0),
    item: str | None = None,
    _sources: _Sources | None = None,
) -> Conversation:
    """One conversation (see the module docstring) of about `duration` seconds."""
    if not 1 <= num_speakers <= len(corpus):
        raise ValueError(f"num_speakers must be in 1..{len(corpus)}, got {num_speakers}")
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be a probability in [0, 1], got {overlap}")
    rng = np.random.default_rng(seed)
    sources = _sources or _Sources(corpus)
    speakers = [str(s) for s in rng.choice(sorted(corpus), size=num_speakers, replace=False)]
    order = list(rng.permutation(speakers))
    placed: list[tuple[int, np.ndarray]] = []
    reference: list[Segment] = []
    position = int(rng.uniform(*gap) * SAMPLE_RATE)
    last: str | None = None
    while position < duration * SAMPLE_RATE or order:
        if order:
            speaker = str(order.pop(0))
        else:
            speaker = str(rng.choice([s for s in speakers if s != last])) if num_speakers > 1 else speakers[0]
        piece = _level(_cut_turn(sources, speaker, rng, turn), _TARGET_DBFS + rng.uniform(-2, 2))
        placed.append((position, piece))
        for a, b in _speech_spans(piece, pause):
            reference.append(Segment(round((position + a) / SAMPLE_RATE, 6), round((position + b) / SAMPLE_RATE, 6), speaker))
        advance = len(piece) + int(rng.uniform(*gap) * SAMPLE_RATE)
        # drawn only when asked, so overlap=0 keeps every earlier seed's conversation
        if overlap > 0 and rng.random() < overlap:
            advance = max(len(piece) // 2, len(piece) - int(rng.uniform(*overlap_seconds) * SAMPLE_RATE))
        position += advance
        last = speaker
    end = max(position, max(start + len(piece) for start, piece in placed))  # an overlapped last turn
    wav = (rng.standard_normal(end) * 10 ** (noise_dbfs / 20)).astype(np.float32)
    for start, piece in placed:
        wav[start : start + len(piece)] += piece
    name = item or f"conv{seed:05d}-{num_speakers}spk"
    return Conversation(name, np.clip(wav, -1.0, 1.0), SAMPLE_RATE, reference, speakers)


def make_conversations(
    corpus: Mapping[str, Sequence[str]],
    count: int,
    seed: int,
    speakers: tuple[int, int] = (2, 4),
    durations: tuple[float, float] = (60.0, 60.0),
    **options: object,
) -> list[Conversation]:
    """`count` conversations of 2..4 speakers and `durations` seconds (uniform) each,
    from seeds derived from `seed`."""
    rng = np.random.default_rng(seed)
    sources = _Sources(corpus)
    out = []
    for k in range(count):
        n = int(rng.integers(speakers[0], speakers[1] + 1))
        duration = float(rng.uniform(*durations))
        out.append(
            make_conversation(corpus, n, seed=seed * 1000 + k, duration=duration, _sources=sources, **options)  # type: ignore[arg-type]
        )
    return out
