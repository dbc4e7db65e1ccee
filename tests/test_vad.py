"""VAD: silero (shipped weights, batched) and webrtc regions on speech (real, or synthetic
without ../shared/data) and silence."""

from __future__ import annotations

import numpy as np
import pytest

from embstore.segments import vad
from embstore.audio.io import load_for_model

pytest.importorskip("webrtcvad")


def _silero_present() -> bool:
    try:
        vad._silero_dir()
        return True
    except vad.VadError:
        return False


needs_silero = pytest.mark.skipif(not _silero_present(), reason="silero-vad is not installed")


@pytest.fixture(scope="module")
def utterances(speech_corpus):
    """One utterance per speaker: 10 real ones of 2-23 s, or 5 synthetic ones of 7 s
    (tests/audio_factory.py: formant speech that silero detects; the assertions below hold
    for both)."""
    return [load_for_model(str(f), 16000) for f in speech_corpus.first_of_each_speaker()]


def _two_with_gap(utterances, gap_s=2.0):
    a, b = utterances[0], utterances[1]
    gap = np.zeros(int(gap_s * 16000), dtype=np.float32)
    return np.concatenate([a, gap, b]), len(a) / 16000, (len(a) + len(gap)) / 16000


def test_config_errors_are_one_line():
    for bad in ({"method": "sad"}, {"threshold": 1.5}, {"webrtc_mode": 7}, {"min_silence_ms": -1},
                {"threshold": 0.5, "neg_threshold": 0.7}):
        with pytest.raises(vad.VadError) as err:
            vad.VadConfig(**bad)
        assert "\n" not in str(err.value)


def test_frames_to_regions_hysteresis_and_padding():
    cfg = vad.VadConfig(threshold=0.5, min_speech_ms=0, min_silence_ms=0, speech_pad_ms=0)
    frame, rate = 100, 1000  # 0.1 s frames at 1 kHz keep the arithmetic readable
    probs = [0.0, 0.9, 0.9, 0.4, 0.9, 0.1, 0.0, 0.8, 0.0]
    # 0.4 is between neg (0.35) and threshold: speech continues through it
    assert vad.frames_to_regions(probs, 900, rate, frame, cfg) == [(0.1, 0.5), (0.7, 0.8)]
    padded = vad.VadConfig(threshold=0.5, min_speech_ms=0, min_silence_ms=0, speech_pad_ms=50)
    assert vad.frames_to_regions(probs, 900, rate, frame, padded) == [(0.05, 0.55), (0.65, 0.85)]
    dropped = vad.VadConfig(threshold=0.5, min_speech_ms=150, min_silence_ms=0, speech_pad_ms=0)
    assert vad.frames_to_regions(probs, 900, rate, frame, dropped) == [(0.1, 0.5)]


@needs_silero
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # silero's own loader's importlib and jit calls
@pytest.mark.parametrize("backend", ["onnx", "jit"])
def test_silero_regions_equal_get_speech_timestamps(utterances, backend):
    """Our batched probabilities + state machine == silero's own per-chunk loop."""
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    try:
        # silero_vad/__init__ sets torch threads to 1 for the process: restore them after
        from silero_vad import get_speech_timestamps, load_silero_vad

        model = load_silero_vad(onnx=False)
    finally:
        torch.set_num_threads(threads)
    probs = vad.silero_probabilities(utterances, backend=backend)
    for threshold in (0.5, 0.18):
        cfg = vad.VadConfig(threshold=threshold, min_silence_ms=100, speech_pad_ms=30, min_speech_ms=250)
        for wav, p in zip(utterances[:4], probs):
            theirs = [
                (d["start"] / 16000, d["end"] / 16000)
                for d in get_speech_timestamps(torch.from_numpy(wav), model, threshold=threshold)
            ]
            assert vad.frames_to_regions(p, len(wav), 16000, 512, cfg) == theirs


@needs_silero
def test_silero_backends_agree_and_blocks_carry_state(utterances):
    pytest.importorskip("onnxruntime")
    long = np.concatenate(utterances[:4])  # > 512 frames: several ONNX blocks
    assert len(long) > vad.SILERO_BLOCK * vad.SILERO_FRAME
    onnx = vad.silero_probabilities([long, utterances[4]], backend="onnx")
    jit = vad.silero_probabilities([long, utterances[4]], backend="jit")
    for a, b in zip(onnx, jit):
        assert a.shape == b.shape
        assert np.abs(a - b).max() < 1e-4


@pytest.mark.parametrize("method", [pytest.param("silero", marks=needs_silero), "webrtc"])
def test_regions_cover_speech_and_find_the_gap(utterances, method):
    wav, gap_start, gap_end = _two_with_gap(utterances)
    regions = vad.speech_regions(wav, 16000, method)
    assert regions == vad.speech_regions(wav, 16000, vad.VadConfig(method=method))
    assert regions and regions == sorted(regions)
    assert all(a < b for a, b in regions)
    # nothing inside the silent gap (beyond the padding), and speech on both sides
    inside = [(a, b) for a, b in regions if b > gap_start + 0.3 and a < gap_end - 0.3]
    assert inside == []
    assert any(a < gap_start for a, _ in regions) and any(b > gap_end for _, b in regions)
    covered = sum(b - a for a, b in regions)
    speech = gap_start + (len(wav) / 16000 - gap_end)
    assert 0.6 * speech < covered <= speech + 0.5


@pytest.mark.parametrize("method", [pytest.param("silero", marks=needs_silero), "webrtc"])
def test_most_of_each_utterance_is_speech(utterances, method):
    # read speech, real (silero 75-99 % of each file, webrtc 84-100 %) or synthetic (all of it):
    # with too little found here, every window and diarization test below would test little
    for wav in utterances:
        covered = sum(b - a for a, b in vad.speech_regions(wav, 16000, method))
        assert 0.7 * len(wav) / 16000 < covered <= len(wav) / 16000 + 1e-6


@pytest.mark.parametrize("method", [pytest.param("silero", marks=needs_silero), "webrtc", "none"])
def test_silence_has_no_regions(method):
    assert vad.speech_regions(np.zeros(16000 * 3, dtype=np.float32), 16000, method) == []


@needs_silero
def test_other_rates_are_resampled(utterances):
    from embstore.audio.io import resample

    wav = utterances[2]
    at16 = vad.speech_regions(wav, 16000, "silero")
    at8 = vad.speech_regions(resample(wav, 16000, 8000), 8000, "silero")
    # resampling changes the probabilities a little: the same speech, not the same cuts
    grid = np.zeros((2, int(len(wav) / 160) + 1), dtype=bool)
    for row, regions in enumerate((at16, at8)):
        for a, b in regions:
            grid[row, int(a * 100) : int(b * 100)] = True
    assert (grid[0] & grid[1]).sum() / (grid[0] | grid[1]).sum() > 0.9


def test_none_is_whole_item_and_batch_matches_single(utterances):
    wav = utterances[0]
    assert vad.speech_regions(wav, 16000, "none") == [(0.0, len(wav) / 16000)]
    batch = vad.speech_regions_batch(utterances[:3], 16000, "webrtc")
    assert batch == [vad.speech_regions(w, 16000, "webrtc") for w in utterances[:3]]


def test_fingerprint_dict_names_method_and_settings():
    assert vad.VadConfig(method="none").as_dict() == {"method": "none"}
    web = vad.VadConfig(method="webrtc").as_dict()
    assert web["webrtc_mode"] == 2 and web["threshold"] == 0.2
    if _silero_present():
        assert vad.VadConfig().as_dict()["model"].startswith("silero-vad ")


def test_speech_only_keeps_the_regions(utterances):
    wav, _, _ = _two_with_gap(utterances)
    regions = vad.speech_regions(wav, 16000, "webrtc")
    kept = vad.speech_only(wav, 16000, regions, "webrtc")
    assert len(kept) == sum(int(round(b * 16000)) - int(round(a * 16000)) for a, b in regions)
    assert len(kept) < len(wav) - 1.5 * 16000  # the 2 s gap is gone (padding aside)
    with pytest.raises(vad.NoSpeech, match="no speech found by the silero VAD"):
        vad.speech_only(wav, 16000, [], "silero")
