"""Voice activity detection: speech regions of a waveform, in seconds.

    silero   Silero VAD, whose weights ship inside the `silero-vad` wheel (no download).
             Run through onnxruntime when it is installed (the wheel's "sequence" ONNX
             export: one call per block of 512 frames of 32 ms, LSTM state carried between
             blocks), else through torch with the wheel's JIT model (one call per 32 ms
             frame for a batch of files at once). Both give silero's own frame
             probabilities (the ONNX path bit-exactly, the JIT path within ~3e-6).
    webrtc   webrtcvad (Google's WebRTC GMM VAD) 30 ms frame decisions.
    none     the whole waveform is one region (after checking it is not silent).

Frame probabilities (webrtc: 0/1 decisions) become regions with silero's own state
machine (`get_speech_timestamps_from_probs`, reproduced here without torch, for
`max_speech_duration_s=inf`): speech starts at a frame >= threshold, ends after
`min_silence_ms` below `neg_threshold`, regions shorter than `min_speech_ms` are
dropped and every region is padded by `speech_pad_ms` (half the gap when two are
closer than two pads).

Nothing here imports torch or onnxruntime at module import, nor `silero_vad/__init__`
(which imports torch and calls `torch.set_num_threads(1)` for the whole process): the
model files are found with `importlib.util.find_spec` and loaded directly.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np

from embstore.audio.io import resample
from embstore.errors import NoSpeech, VadError, VadUnavailable

VAD_METHODS = ("silero", "webrtc", "none")
SILERO_RATE = 16000
SILERO_FRAME = 512  # samples per frame at 16 kHz (32 ms)
SILERO_CONTEXT = 64  # samples of the previous frame the model sees before each frame
# frames per ONNX call: ~16 s of audio, the wheel's own default for the sequence model
SILERO_BLOCK = 512
WEBRTC_RATES = (8000, 16000, 32000, 48000)

Region = tuple[float, float]
# silero's `get_speech_timestamps` defaults, for VadConfig(**SILERO_DEFAULTS)
SILERO_DEFAULTS = {"threshold": 0.5, "min_speech_ms": 250.0, "min_silence_ms": 100.0, "speech_pad_ms": 30.0}


@dataclass(frozen=True)
class VadConfig:
    """Every setting that changes the regions; `as_dict()` goes into fingerprints."""

    method: str = "silero"
    # Not silero's own defaults (0.5, 250, 100, 30: `SILERO_DEFAULTS`): a lower
    # threshold as in WeSpeaker's diarization recipe (0.18), and pauses under 0.5 s
    # kept inside a region, tuned for diarization on synthetic conversations, where
    # silero's defaults missed 9 % of the reference speech (mostly short pauses and
    # soft word endings) and these 2 % with 0.4 % false alarm.
    threshold: float = 0.2
    # silero's default is threshold - 0.15 (floored at 0.01); None keeps that rule
    neg_threshold: float | None = None
    min_speech_ms: float = 250.0
    min_silence_ms: float = 500.0
    speech_pad_ms: float = 100.0
    # 3 (resemblyzer's) missed 6 % of the synthetic reference speech, 2 missed 1.6 %;
    # 0-1 missed less still but let through more noise (a trade a white -60 dBFS floor
    # does not measure), so the middle setting
    webrtc_mode: int = 2
    webrtc_frame_ms: int = 30

    def __post_init__(self) -> None:
        if self.method not in VAD_METHODS:
            raise VadError(f"unknown VAD {self.method!r}: use one of {', '.join(VAD_METHODS)}")
        if not 0.0 < self.threshold < 1.0:
            raise VadError(f"VAD threshold must be in (0, 1), got {self.threshold}")
        if self.neg_threshold is not None and not 0.0 <= self.neg_threshold <= self.threshold:
            raise VadError(f"VAD neg_threshold must be in [0, threshold], got {self.neg_threshold}")
        if self.webrtc_mode not in (0, 1, 2, 3):
            raise VadError(f"webrtc mode must be 0..3, got {self.webrtc_mode}")
        if self.webrtc_frame_ms not in (10, 20, 30):
            raise VadError(f"webrtc frames must be 10, 20 or 30 ms, got {self.webrtc_frame_ms}")
        for name in ("min_speech_ms", "min_silence_ms", "speech_pad_ms"):
            if getattr(self, name) < 0:
                raise VadError(f"VAD {name} must be >= 0, got {getattr(self, name)}")

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.method == "none":
            return {"method": "none"}
        if self.method == "silero":
            data.pop("webrtc_mode")
            data.pop("webrtc_frame_ms")
            data["model"] = "silero-vad " + _silero_version()
        return data


def check_available(vad: str | VadConfig) -> None:
    """Raise VadUnavailable, naming the package to install, when the VAD cannot run on
    this machine; a run asks before it claims any item."""
    config = vad_config(vad)
    if config.method == "silero":
        folder = _silero_dir()
        model = "silero_vad_16k_sequence.onnx" if silero_backend() == "onnx" else "silero_vad.jit"
        if not os.path.isfile(os.path.join(folder, model)):
            raise VadUnavailable(f"the silero-vad package lacks its model file {model}: pip install --force-reinstall"
                                 " 'silero-vad>=6', then run the command again")
    elif config.method == "webrtc":
        if importlib.util.find_spec("webrtcvad") is None:
            raise VadUnavailable("the webrtc VAD needs the webrtcvad package, which is not installed:"
                                 " pip install webrtcvad (or reinstall embstore), then run the command again")
        try:
            _webrtcvad()
        except ImportError as exc:  # installed, but its compiled part does not load
            raise VadUnavailable(f"the webrtc VAD needs the webrtcvad package, which cannot be imported ({exc}):"
                                 " pip install --force-reinstall webrtcvad, then run the command again") from None


def vad_config(vad: str | VadConfig | None, **settings: Any) -> VadConfig:
    """A VadConfig from a method name (None means "none") or a config, with overrides."""
    if isinstance(vad, VadConfig):
        return replace(vad, **settings) if settings else vad
    return VadConfig(method=(vad or "none").strip().lower(), **settings)


def speech_regions(
    wav: np.ndarray, sample_rate: int, method: str | VadConfig = "silero", **settings: Any
) -> list[Region]:
    """Speech regions [(start_s, end_s), ...] of one mono waveform, sorted, disjoint."""
    return speech_regions_batch([wav], sample_rate, method, **settings)[0]


def speech_regions_batch(
    wavs: Sequence[np.ndarray], sample_rate: int, method: str | VadConfig = "silero", **settings: Any
) -> list[list[Region]]:
    """`speech_regions` of several waveforms of one rate (batched where the model allows)."""
    config = vad_config(method, **settings)
    wavs = [_mono(w) for w in wavs]
    if config.method == "none":
        return [[(0.0, len(w) / sample_rate)] if np.any(w) else [] for w in wavs]
    if config.method == "webrtc":
        return [_webrtc_regions(w, sample_rate, config) for w in wavs]
    resampled = [resample(w, sample_rate, SILERO_RATE) for w in wavs]
    probs = silero_probabilities(resampled)
    return [
        frames_to_regions(p, len(w), SILERO_RATE, SILERO_FRAME, config) for p, w in zip(probs, resampled)
    ]


def speech_only(wav: np.ndarray, sample_rate: int, regions: Sequence[Region], method: str = "vad") -> np.ndarray:
    """The samples inside `regions`, concatenated: a whole-item embedding of speech only.

    `NoSpeech` when there are no regions (an item that must fail with that reason).
    """
    wav = _mono(wav)
    ranges = [(int(round(a * sample_rate)), int(round(b * sample_rate))) for a, b in regions]
    ranges = [(max(a, 0), min(b, len(wav))) for a, b in ranges if min(b, len(wav)) > max(a, 0)]
    if not ranges:
        raise NoSpeech(f"no speech found by the {method} VAD")
    return np.concatenate([wav[a:b] for a, b in ranges])


def _mono(wav: np.ndarray) -> np.ndarray:
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise VadError(f"expected a mono waveform, got shape {wav.shape}")
    return wav


def frames_to_regions(
    probs: np.ndarray, num_samples: int, sample_rate: int, frame: int, config: VadConfig
) -> list[Region]:
    """Silero's `get_speech_timestamps_from_probs` state machine (max_speech = inf), in seconds.

    `probs[i]` is the speech probability of samples [i*frame, (i+1)*frame). Sample
    arithmetic (floats where silero uses floats, int() where it truncates) follows silero
    so that the regions equal its own to the sample.
    """
    threshold = config.threshold
    neg = config.neg_threshold if config.neg_threshold is not None else max(threshold - 0.15, 0.01)
    min_speech = sample_rate * config.min_speech_ms / 1000
    min_silence = sample_rate * config.min_silence_ms / 1000
    pad = sample_rate * config.speech_pad_ms / 1000
    speeches: list[list[float]] = []
    triggered = False
    start = 0
    temp_end = 0
    for i, prob in enumerate(np.asarray(probs, dtype=np.float64).tolist()):
        cur = frame * i
        if prob >= threshold:
            temp_end = 0
            if not triggered:
                triggered, start = True, cur
            continue
        if triggered and prob < neg:
            if not temp_end:
                temp_end = cur
            if cur - temp_end < min_silence:
                continue
            if temp_end - start > min_speech:
                speeches.append([start, temp_end])
            triggered, temp_end = False, 0
    if triggered and num_samples - start > min_speech:
        speeches.append([start, num_samples])
    for i, speech in enumerate(speeches):
        if i == 0:
            speech[0] = int(max(0, speech[0] - pad))
        if i != len(speeches) - 1:
            gap = speeches[i + 1][0] - speech[1]
            if gap < 2 * pad:
                speech[1] += int(gap // 2)
                speeches[i + 1][0] = int(max(0, speeches[i + 1][0] - gap // 2))
            else:
                speech[1] = int(min(num_samples, speech[1] + pad))
                speeches[i + 1][0] = int(max(0, speeches[i + 1][0] - pad))
        else:
            speech[1] = int(min(num_samples, speech[1] + pad))
    return [(s / sample_rate, e / sample_rate) for s, e in speeches]


# ---------------------------------------------------------------- silero


def _silero_dir() -> str:
    """The installed silero_vad package's data folder, without importing the package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VadUnavailable("the silero VAD needs the silero-vad package, which is not installed:"
                             " pip install 'silero-vad>=6' (or reinstall embstore), then run the command again")
    return os.path.join(next(iter(spec.submodule_search_locations)), "data")


@functools.lru_cache(maxsize=1)
def _silero_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("silero-vad")
    except PackageNotFoundError:
        return "absent"


def silero_backend() -> str:
    """"onnx" (onnxruntime and the wheel's sequence model present) or "jit" (torch)."""
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    has_sequence = os.path.exists(os.path.join(_silero_dir(), "silero_vad_16k_sequence.onnx"))
    return "onnx" if has_ort and has_sequence else "jit"


def silero_probabilities(wavs: Sequence[np.ndarray], backend: str | None = None) -> list[np.ndarray]:
    """Silero's speech probability of every 512-sample frame of each 16 kHz waveform.

    Frames are padded with zeros at the end, as `get_speech_timestamps` pads its last chunk.
    """
    backend = backend or silero_backend()
    if backend == "onnx":
        return [_onnx_sequence_probs(w) for w in wavs]
    if backend == "jit":
        return _jit_batched_probs(wavs)
    raise VadError(f"unknown silero backend {backend!r}: use onnx or jit")


def _framed(wav: np.ndarray) -> np.ndarray:
    """[frames, 64 + 512]: each frame after the last 64 samples of the one before (zeros
    before the first), which is what the streaming model keeps as its context."""
    count = -(-len(wav) // SILERO_FRAME)
    frames = np.zeros((count, SILERO_FRAME), dtype=np.float32)
    frames.reshape(-1)[: len(wav)] = wav
    context = np.zeros((count, SILERO_CONTEXT), dtype=np.float32)
    if count > 1:
        context[1:] = frames[:-1, -SILERO_CONTEXT:]
    return np.concatenate((context, frames), axis=1)


@functools.lru_cache(maxsize=1)
def _onnx_session() -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # the model is tiny and sequential: one thread each, callers parallelise over files
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the export has unused initialisers it warns about
    path = os.path.join(_silero_dir(), "silero_vad_16k_sequence.onnx")
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def _onnx_sequence_probs(wav: np.ndarray) -> np.ndarray:
    if len(wav) == 0:
        return np.zeros(0, dtype=np.float32)
    session = _onnx_session()
    h = np.zeros((1, 1, 128), dtype=np.float32)
    c = np.zeros((1, 1, 128), dtype=np.float32)
    out = []
    # frame the audio block by block so a one-hour file never holds all frames twice
    step = SILERO_BLOCK * SILERO_FRAME
    for first in range(0, len(wav), step):
        lead = wav[first - SILERO_CONTEXT : first] if first else np.zeros(0, dtype=np.float32)
        block = _framed(wav[first : first + step])
        if first:
            block[0, :SILERO_CONTEXT] = lead
        probs, h, c = session.run(["speech_probs", "hn", "cn"], {"input": block, "h": h, "c": c})
        out.append(np.asarray(probs, dtype=np.float32).reshape(-1))
    return np.concatenate(out)


@functools.lru_cache(maxsize=1)
def _jit_model() -> Any:
    import warnings

    import torch

    with warnings.catch_warnings():
        # torch 2.10+ deprecates TorchScript loading; the wheel ships TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(os.path.join(_silero_dir(), "silero_vad.jit"), map_location="cpu")
    return model.eval()


def _jit_batched_probs(wavs: Sequence[np.ndarray], batch: int = 64) -> list[np.ndarray]:
    """The JIT model steps one frame at a time; a batch of files shares each step.

    Files are grouped by length so that short files do not pay for a long one's frames.
    The model keeps its LSTM state and 64-sample context inside; `reset_states` starts
    each group from zeros, as `get_speech_timestamps` does for each file.
    """
    import torch

    model = _jit_model()
    out: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(wavs)
    order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
    for k in range(0, len(order), batch):
        group = [i for i in order[k : k + batch] if len(wavs[i])]
        if not group:
            continue
        counts = [-(-len(wavs[i]) // SILERO_FRAME) for i in group]
        audio = np.zeros((len(group), max(counts) * SILERO_FRAME), dtype=np.float32)
        for slot, i in enumerate(group):
            audio[slot, : len(wavs[i])] = wavs[i]
        tensor = torch.from_numpy(audio)
        probs = np.zeros((len(group), max(counts)), dtype=np.float32)
        model.reset_states()
        with torch.inference_mode():
            for f in range(max(counts)):
                chunk = tensor[:, f * SILERO_FRAME : (f + 1) * SILERO_FRAME]
                probs[:, f] = model(chunk, SILERO_RATE)[:, 0].numpy()
        for slot, i in enumerate(group):
            out[i] = probs[slot, : counts[slot]]
    return out


# ---------------------------------------------------------------- webrtc


def _webrtcvad() -> Any:
    import warnings

    with warnings.catch_warnings():
        # webrtcvad's import warns that pkg_resources is deprecated
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        import webrtcvad
    return webrtcvad


def _webrtc_regions(wav: np.ndarray, sample_rate: int, config: VadConfig) -> list[Region]:
    webrtcvad = _webrtcvad()
    rate = sample_rate if sample_rate in WEBRTC_RATES else SILERO_RATE
    wav = resample(wav, sample_rate, rate)
    frame = rate * config.webrtc_frame_ms // 1000
    usable = len(wav) - len(wav) % frame
    pcm = (np.clip(wav[:usable], -1.0, 1.0) * 32767).round().astype("<i2").tobytes()
    vad = webrtcvad.Vad(config.webrtc_mode)
    step = 2 * frame
    flags = np.fromiter(
        (vad.is_speech(pcm[k : k + step], rate) for k in range(0, len(pcm), step)), dtype=np.float32,
        count=usable // frame,
    )
    # 0/1 decisions through the same hysteresis: the 0.5 threshold splits them exactly
    return frames_to_regions(flags, len(wav), rate, frame, config)
