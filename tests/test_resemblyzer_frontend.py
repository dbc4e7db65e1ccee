"""The vectorised Resemblyzer frontend against the package it replaces.

Every step is compared with resemblyzer's own function on real speech: the kept samples
of the VAD trimming must be identical, the mel within 1e-5 relative per element of
librosa's, and the embeddings cosine >= 0.999999 to
`VoiceEncoder().embed_utterance(preprocess_wav(path))`.
"""

from __future__ import annotations

import pickle
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest

from embstore.audio.io import load_for_model
from embstore.models import resemblyzer_frontend as rf
from embstore.vectors import cosine_rows

pytest.importorskip("resemblyzer")
torch = pytest.importorskip("torch")

MEL_RTOL = 1e-5
SAME = 0.999999  # cosine: float rounding only
# the key stores have used for the default model since it shipped; the same numbers keep it
FINGERPRINT = "04d6bf2efdccbf335dd943c9"


@pytest.fixture(scope="module")
def package():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # webrtcvad's pkg_resources, scipy.ndimage.morphology
        from resemblyzer import audio, hparams
        from resemblyzer.voice_encoder import VoiceEncoder
    return audio, hparams, VoiceEncoder


@pytest.fixture(scope="module")
def encoder():
    from embstore.models.resemblyzer import ResemblyzerEncoder

    return ResemblyzerEncoder()


@pytest.fixture(scope="module")
def speech(shared_data) -> list[tuple[str, np.ndarray]]:
    return [(str(p), load_for_model(str(p), 16000)) for p in sorted(shared_data.glob("*/*.flac"))]


def rel_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest per-element relative difference (exact zeros must stay exact)."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.float32
    diff = np.abs(ours.astype(np.float64) - theirs)
    scale = np.abs(theirs.astype(np.float64))
    assert np.all(diff[scale == 0] == 0)
    return float((diff[scale > 0] / scale[scale > 0]).max(initial=0.0))


def test_constants_are_the_packages(package) -> None:
    _, hp, _ = package
    assert (rf.SAMPLE_RATE, rf.MEL_WINDOW_MS, rf.MEL_STEP_MS, rf.N_MELS, rf.PARTIAL_FRAMES) == (
        hp.sampling_rate, hp.mel_window_length, hp.mel_window_step, hp.mel_n_channels, hp.partials_n_frames)
    assert (rf.VAD_WINDOW_MS, rf.VAD_AVERAGE_WIDTH, rf.VAD_MAX_SILENCE, rf.NORM_TARGET_DBFS) == (
        hp.vad_window_length, hp.vad_moving_average_width, hp.vad_max_silence_length, hp.audio_norm_target_dBFS)
    assert (rf.N_FFT, rf.HOP) == (int(hp.sampling_rate * hp.mel_window_length / 1000),
                                  int(hp.sampling_rate * hp.mel_window_step / 1000))


def test_filterbank_and_window_are_librosas() -> None:
    import librosa
    import scipy.signal

    np.testing.assert_array_equal(rf.mel_filterbank(), librosa.filters.mel(sr=16000, n_fft=400, n_mels=40))
    np.testing.assert_allclose(rf.hann_window(), scipy.signal.get_window("hann", 400, fftbins=True), rtol=0, atol=1e-15)
    assert not rf.mel_filterbank().flags.writeable  # cached and shared: nobody may scale it in place


@pytest.mark.parametrize("n", [0, 1, 159, 160, 199, 200, 201, 399, 400, 401, 16000, 16001,
                               rf._BLOCK_FRAMES * rf.HOP - 1, rf._BLOCK_FRAMES * rf.HOP, 3 * rf._BLOCK_FRAMES * rf.HOP + 7])
def test_mel_equals_librosa_at_edge_lengths(package, n: int) -> None:
    audio, _, _ = package
    wav = (np.random.default_rng(n).standard_normal(n) * 0.1).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # librosa: n_fft too large for the shortest inputs
        theirs = audio.wav_to_mel_spectrogram(wav)
    assert rel_error(rf.mel_spectrogram(wav), theirs) <= MEL_RTOL


def test_mel_equals_librosa_on_speech(package, speech) -> None:
    audio, _, _ = package
    for _, wav in speech[::10]:
        trimmed = rf.trim_long_silences(rf.normalize_volume(wav))
        assert rel_error(rf.mel_spectrogram(trimmed), audio.wav_to_mel_spectrogram(trimmed)) <= MEL_RTOL
    silence_then_speech = np.concatenate([np.zeros(8000, np.float32), speech[0][1][:32000]])
    assert rel_error(rf.mel_spectrogram(silence_then_speech), audio.wav_to_mel_spectrogram(silence_then_speech)) <= MEL_RTOL


def test_dilation_equals_scipys() -> None:
    from scipy.ndimage import binary_dilation

    rng = np.random.default_rng(0)
    for n in [0, 1, 2, 6, 7, 8, 50, 333]:
        for p in (0.05, 0.3, 0.7):
            mask = rng.random(n) < p
            np.testing.assert_array_equal(rf.dilate(mask), binary_dilation(mask, np.ones(rf.VAD_MAX_SILENCE + 1)))


def test_normalisation_and_trimming_keep_the_same_samples(package, speech) -> None:
    """All 100 shared files: the same normalised samples, the same VAD decisions, the same kept samples."""
    audio, _, _ = package
    for path, wav in speech:
        normalised = audio.normalize_volume(wav, -30, increase_only=True)
        np.testing.assert_array_equal(rf.normalize_volume(wav), normalised, err_msg=path)
        np.testing.assert_array_equal(rf.trim_long_silences(normalised), audio.trim_long_silences(normalised), err_msg=path)
    loud = speech[0][1] * 8  # above -30 dBFS: increase_only leaves it alone
    np.testing.assert_array_equal(rf.normalize_volume(loud), audio.normalize_volume(loud, -30, increase_only=True))


def test_partial_slices_are_the_packages(package) -> None:
    _, _, VoiceEncoder = package
    for rate, coverage in [(1.3, 0.75), (1.0, 0.5), (0.625, 1.0), (4.0, 0.1)]:
        for n in [0, 1, 159, 160, 4000, 25599, 25600, 25601, 40000, 123457]:
            wav_slices, mel_slices = VoiceEncoder.compute_partial_slices(n, rate, coverage)
            assert rf.partial_slices(n, rate, coverage) == (wav_slices[-1].stop, mel_slices)
    with pytest.raises(ValueError, match="rate"):
        rf.partial_slices(16000, 0.5, 0.75)
    with pytest.raises(ValueError, match="min_coverage"):
        rf.partial_slices(16000, 1.3, 0.0)


def test_refuses_what_the_package_cannot_embed() -> None:
    with pytest.raises(ValueError, match="silent"):
        rf.features(np.zeros(16000, np.float32))
    with pytest.raises(ValueError, match="no speech"):
        rf.features(np.full(400, 0.01, np.float32))  # shorter than one VAD frame
    with pytest.raises(ValueError, match="mono"):
        rf.features(np.ones((2, 16000), np.float32))


def test_network_and_fingerprint_are_the_packages(package, encoder) -> None:
    from embstore.models.base import fingerprint_of

    _, _, VoiceEncoder = package
    theirs = VoiceEncoder("cpu", verbose=False).eval()
    assert fingerprint_of(theirs.state_dict(), encoder.frontend) == encoder.fingerprint == FINGERPRINT
    mels = torch.from_numpy(np.random.default_rng(1).random((5, 160, 40), dtype=np.float32))
    with torch.inference_mode():
        torch.testing.assert_close(encoder.model(mels), theirs(mels), rtol=0, atol=0)


def _embed_three_ways(package, encoder, paths: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    audio, _, VoiceEncoder = package
    theirs = VoiceEncoder("cpu", verbose=False)
    reference = np.stack([theirs.embed_utterance(audio.preprocess_wav(p)) for p in paths])
    single = np.stack([encoder.embed_file(p) for p in paths])
    batch = encoder.embed_batch([encoder.features(encoder.load(p)) for p in paths])
    return reference, single, batch


def test_embeddings_equal_the_package_on_a_few_files(package, encoder, speech) -> None:
    reference, single, batch = _embed_three_ways(package, encoder, [p for p, _ in speech[3::33]])
    assert cosine_rows(single, reference).min() >= SAME
    assert cosine_rows(batch, single).min() >= SAME


@pytest.mark.slow
@pytest.mark.exhaustive
def test_embeddings_equal_the_package_on_all_shared_files(package, encoder, speech) -> None:
    reference, single, batch = _embed_three_ways(package, encoder, [p for p, _ in speech])
    assert len(reference) == 100
    assert cosine_rows(single, reference).min() >= SAME
    assert cosine_rows(batch, single).min() >= SAME
    assert cosine_rows(batch, reference).min() >= SAME


def test_process_pool_function(encoder, speech) -> None:
    """resemblyzer_features is what a loader process pool calls: picklable, no model, same windows."""
    from embstore.models.resemblyzer import ResemblyzerEncoder

    path = speech[7][0]
    assert pickle.loads(pickle.dumps(rf.resemblyzer_features)) is rf.resemblyzer_features
    other_rate = ResemblyzerEncoder(rate=2.0)
    fns = [encoder.path_features(), pickle.loads(pickle.dumps(other_rate.path_features()))]
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        whole, cut = pool.map(fns[0], [path, path], [None, 0.5], [None, 3.0])
        faster = pool.submit(fns[1], path).result()
    np.testing.assert_array_equal(whole, encoder.features(encoder.load(path)))
    np.testing.assert_array_equal(cut, encoder.features(encoder.load(path, 0.5, 3.0)))
    np.testing.assert_array_equal(faster, other_rate.features(other_rate.load(path)))
    assert len(faster) > len(whole)
