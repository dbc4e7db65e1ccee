"""Audio files made by the tests themselves: no data needed beyond numpy, scipy + soundfile;
and `SpeechCorpus`, the real speech corpus or a small synthetic one in its layout."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from embstore.synthetic import voice


def write(path: Path, seconds: float = 1.0, rate: int = 16000, pitch: float = 140.0, seed: int = 0,
          subtype: str | None = None, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = voice(seconds, rate, pitch, seed)
    if channels > 1:
        data = np.stack([data * (1 - 0.1 * c) for c in range(channels)], axis=1)
    sf.write(str(path), data, rate, subtype=subtype)
    return path


def make_tree(root: Path, speakers: int = 3, per_speaker: int = 2, seconds: float = 1.0,
              dataset: str = "ds", ext: str = "wav") -> list[Path]:
    """ROOT/<dataset>/<speaker>/<speaker>-<n>.<ext>, distinct pitch per speaker."""
    out = []
    for s in range(speakers):
        for n in range(per_speaker):
            p = root / dataset / f"spk{s}" / f"spk{s}-{n}.{ext}"
            out.append(write(p, seconds + 0.13 * n, pitch=110 + 35 * s, seed=100 * s + n))
    return out


# -- synthetic speech -------------------------------------------------------------------------
#
# `embstore.synthetic.voice` (harmonics with a 4 Hz envelope) is audio, not speech: webrtc
# marks it as speech, but silero's probability stays below its threshold (0 to 0.8 s of a
# 4 s voice detected, pitch 100-190 Hz), and every "through time" path (windows, diarization)
# runs silero by default. `speech` is a small formant synthesiser that silero does detect
# (80-97 % of frames above 0.5) and whose speakers Resemblyzer tells apart (each pair of the
# 5 in a 30 s conversation, seed 1: 2 speakers found, DER under 5 %): phrases of
# consonant-vowel syllables (fricatives, nasals, stops; formant transitions between vowels),
# a Rosenberg glottal source with declination and accents, pauses between phrases, and per
# speaker a voice of its own (pitch, vocal tract length, glottal shape, formant bandwidths and
# gains, an accent on each vowel, favourite vowels, tempo, breathiness, colouring, tilt).

SPEECH_RATE = 16000
_HOP = 160  # 10 ms control frames
# (F1, F2, F3) of eight English vowels (Peterson & Barney, male averages)
_VOWELS = np.array([(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480),
                    (570, 840, 2410), (660, 1720, 2410), (440, 1020, 2240), (390, 1990, 2550)], float)
_NASAL = np.array((250, 1100, 2300), float)


def _resonator(freq: float, bandwidth: float) -> tuple[np.ndarray, float]:
    r = np.exp(-np.pi * bandwidth / SPEECH_RATE)
    return np.array([1.0, -2 * r * np.cos(2 * np.pi * freq / SPEECH_RATE), r * r]), 1 - r


def _glottal(f0: np.ndarray, open_q: float, close_q: float) -> np.ndarray:
    """Rosenberg pulses at `f0` (per sample), differentiated (lip radiation)."""
    phase = np.cumsum(f0) / SPEECH_RATE % 1.0
    pulse = np.where(phase < open_q, 0.5 * (1 - np.cos(np.pi * phase / open_q)),
                     np.where(phase < open_q + close_q, np.cos(0.5 * np.pi * (phase - open_q) / close_q), 0.0))
    return np.diff(pulse, prepend=0.0)


def speaker_voice(speaker: int) -> dict:
    """Speaker `speaker`'s voice, the same on every call."""
    rng = np.random.default_rng(7919 * speaker + 1)
    return dict(
        pitch=float(np.exp(rng.uniform(np.log(90), np.log(220)))),
        scale=float(rng.uniform(0.8, 1.3)),  # formant scale: vocal tract length
        open_q=float(rng.uniform(0.35, 0.5)), close_q=float(rng.uniform(0.1, 0.2)),
        bandwidths=rng.uniform(50, 110, 3),
        accent=rng.uniform(0.82, 1.18, _VOWELS.shape),
        vowel_odds=rng.dirichlet(np.full(len(_VOWELS), 0.3)),
        syllables_per_s=float(rng.uniform(3.5, 6.0)),
        breath=float(rng.uniform(0.0, 0.08)),
        gains=np.array([1.0, *rng.uniform(0.4, 0.9, 2)]),
        colour=[(float(rng.uniform(2800, 4500)), float(rng.uniform(150, 400)), float(rng.uniform(0.2, 0.8))),
                (float(rng.uniform(800, 2600)), float(rng.uniform(300, 800)), float(rng.uniform(-0.5, 0.5)))],
        tilt=float(rng.uniform(-0.9, 0.9)),
        vibrato=float(rng.uniform(0.0, 0.04)),
    )


def speech(seconds: float, speaker: int = 0, seed: int = 0) -> np.ndarray:
    """`seconds` of speaker `speaker`'s synthetic speech at 16 kHz, peak 0.3; phrases of 1-2.5 s
    separated by 0.15-0.45 s pauses at -80 dB. Equal arguments give equal samples."""
    from scipy.signal import lfilter  # here: most tests import this module and need no scipy

    v = speaker_voice(speaker)
    vowels = _VOWELS * v["accent"]
    rng = np.random.default_rng(seed)

    def vowel() -> np.ndarray:
        return vowels[rng.choice(len(vowels), p=v["vowel_odds"])]

    frames = int(seconds * SPEECH_RATE) // _HOP + 1
    formants, voiced, frication = np.zeros((frames, 3)), np.zeros(frames), np.zeros(frames)
    f0 = np.full(frames, v["pitch"])
    k = 0
    while k < frames:
        start, end = k, min(frames, k + int(rng.uniform(1.0, 2.5) * 100))
        target = vowel()
        while k < end:
            kind, c = rng.integers(3), min(int(rng.uniform(4, 9)), end - k)
            if kind == 0:  # fricative
                frication[k:k + c] = 1.0
                formants[k:k + c] = target
            elif kind == 1:  # nasal
                voiced[k:k + c] = 0.3
                formants[k:k + c] = _NASAL
            else:  # stop: a closure, then a burst
                frication[max(k, k + c - 2):k + c] = 1.0
                formants[k:k + c] = target
            k += c
            length = min(int(100 / v["syllables_per_s"] * rng.uniform(0.6, 1.0)), end - k)
            new = vowel()
            ramp = np.linspace(0, 1, max(length, 1))[:, None]
            formants[k:k + length] = target * (1 - ramp) + new * ramp
            voiced[k:k + length] = np.sin(np.pi * (np.arange(length) + 0.5) / max(length, 1)) ** 0.5
            target = new
            k += length
        span = np.arange(k - start)
        f0[start:k] = v["pitch"] * (1.1 - 0.2 * span / max(len(span), 1)) * (
            1 + 0.08 * np.sin(2 * np.pi * span / rng.uniform(20, 40) + rng.uniform(0, 6)))
        k += int(rng.uniform(0.15, 0.45) * 100)  # a pause between phrases
    formants *= v["scale"]
    n = int(seconds * SPEECH_RATE)

    def per_sample(x: np.ndarray) -> np.ndarray:
        return np.repeat(x, _HOP, axis=0)[:n]

    t = np.arange(n) / SPEECH_RATE
    f0s = np.maximum(per_sample(f0), 50.0) * (
        1 + 0.005 * rng.standard_normal(n) + v["vibrato"] * np.sin(2 * np.pi * 5.5 * t))
    source = _glottal(f0s, v["open_q"], v["close_q"]) * v["pitch"] / 120
    source = (source + v["breath"] * 0.05 * rng.standard_normal(n)) * per_sample(voiced)
    noise = 0.015 * rng.standard_normal(n) * per_sample(frication)
    out = np.zeros(n)
    states = [np.zeros(2) for _ in range(3)]
    noise_state = np.zeros(2)
    noise_den, noise_gain = _resonator(4000 * v["scale"], 2000)
    for fr in range(frames):  # the formant filters move every 10 ms, their state carried on
        a, b = fr * _HOP, min(n, (fr + 1) * _HOP)
        if a >= n:
            break
        for j in range(3):
            den, gain = _resonator(formants[fr, j], v["bandwidths"][j] * (1 + 0.5 * j))
            y, states[j] = lfilter([gain], den, source[a:b], zi=states[j])
            out[a:b] += y * v["gains"][j]
        y, noise_state = lfilter([noise_gain], noise_den, noise[a:b], zi=noise_state)
        out[a:b] += y
    coloured = out.copy()  # the speaker's own colouring: an extra resonance, a bump or notch, a tilt
    for freq, bandwidth, gain in v["colour"]:
        den, g = _resonator(freq * v["scale"], bandwidth)
        coloured += 8 * gain * lfilter([g], den, out)
    out = lfilter([1.0, -v["tilt"]], [1.0], coloured)
    out += 1e-4 * np.max(np.abs(out)) * rng.standard_normal(n)
    return (0.3 * out / np.max(np.abs(out))).astype(np.float32)


# -- a speech corpus: the real one, or a small synthetic one ----------------------------------

SYNTHETIC_SPEAKERS = 5
SYNTHETIC_PER_SPEAKER = 4
SYNTHETIC_SECONDS = (7.0, 6.0, 5.0, 4.0)  # a speaker's first file is its longest, as tests cut from it


@dataclass(frozen=True)
class SpeechCorpus:
    """A dataset folder of <speaker>/<file>.flac (LibriSpeech's layout): the real corpus
    (../shared/data, 10 speakers x 10 utterances of 2-23 s) or the synthetic one
    (`write_speech_corpus`, 5 speakers x 4 files of 4-7 s). `real` says which, for the
    few expectations that differ by source (the layout)."""

    path: Path
    real: bool

    def speakers(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.is_dir())

    def files(self, speaker: str | None = None) -> list[Path]:
        return sorted((self.path / speaker).glob("*.flac")) if speaker else sorted(self.path.glob("*/*.flac"))

    def first_of_each_speaker(self) -> list[Path]:
        return [self.files(s)[0] for s in self.speakers()]

    def copy(self, root: Path, speakers: int, per_speaker: int, dataset: str = "ds") -> Path:
        """The first `per_speaker` files of the first `speakers` speakers, copied to
        ROOT/<dataset>/<speaker>/: the small corpus several tests scan. Returns ROOT."""
        for speaker in self.speakers()[:speakers]:
            folder = root / dataset / speaker
            folder.mkdir(parents=True, exist_ok=True)
            for f in self.files(speaker)[:per_speaker]:
                shutil.copy(f, folder / f.name)
        return root


def write_speech_corpus(
    path: Path, speakers: int = SYNTHETIC_SPEAKERS, per_speaker: int = SYNTHETIC_PER_SPEAKER
) -> SpeechCorpus:
    """PATH/spk<s>/spk<s>-<n>.flac of synthetic speech (`speech`), 16 kHz FLAC as the real one."""
    for s in range(speakers):
        for n in range(per_speaker):
            f = path / f"spk{s}" / f"spk{s}-{n:04d}.flac"
            f.parent.mkdir(parents=True, exist_ok=True)
            seconds = SYNTHETIC_SECONDS[n % len(SYNTHETIC_SECONDS)]
            sf.write(str(f), speech(seconds, speaker=s, seed=100 * s + n), SPEECH_RATE, subtype="PCM_16")
    return SpeechCorpus(path, real=False)
