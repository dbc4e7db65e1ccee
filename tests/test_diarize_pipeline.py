"""Window embeddings (Resemblyzer mel path, any encoder's features path) and diarize_audio."""

from __future__ import annotations

import numpy as np
import pytest

from embstore import models
from embstore.audio.io import load_for_model
from embstore.diarize.der import diarization_error, speaker_count
from embstore.diarize.pipeline import (
    Diarization,
    diarize_audio,
    diarize_windows,
)
from embstore.errors import NoSpeech
from embstore.synthetic import corpus_by_speaker, make_conversation
from embstore.segments.window_embed import WindowEmbedder
from embstore.segments.windows import windows_in_regions
from tests.wespeaker_dirs import make_wespeaker_dir


@pytest.fixture(scope="module")
def resemblyzer():
    return models.load("resemblyzer")


@pytest.fixture(scope="module")
def speech(speech_corpus):
    # a real utterance, or 7 s of synthetic speech (tests/audio_factory.py) without ../shared/data
    return load_for_model(str(speech_corpus.files()[0]), 16000)


def _plan(duration: float):
    # full windows, one short last window, and a short region of its own
    return windows_in_regions([(0.0, min(4.1, duration)), (4.5, min(5.3, duration))], 1.5, 0.75, duration)


def test_mel_path_equals_resemblyzer_on_each_window(resemblyzer, speech):
    import torch
    from resemblyzer.audio import normalize_volume, wav_to_mel_spectrogram

    plan = _plan(len(speech) / 16000)
    assert plan.short.any() and not plan.short.all()
    rows = WindowEmbedder(resemblyzer, batch=3).embed(speech, plan)
    assert rows.shape == (len(plan), 256) and np.isfinite(rows).all()
    for k, (s, e) in enumerate(plan):
        piece = normalize_volume(speech[int(round(s * 16000)) : int(round(e * 16000))], -30, increase_only=True)
        mel = wav_to_mel_spectrogram(piece)[None]
        with torch.inference_mode():
            ref = resemblyzer.model(torch.from_numpy(mel)).numpy()[0]
        np.testing.assert_allclose(rows[k], ref, atol=2e-5)


def test_window_rows_do_not_depend_on_batching(resemblyzer, speech):
    plan = windows_in_regions([(0.0, 6.0)], 1.5, 0.75)
    one = WindowEmbedder(resemblyzer, batch=1).embed(speech, plan)
    many = WindowEmbedder(resemblyzer, batch=64).embed(speech, plan)
    np.testing.assert_allclose(one, many, atol=2e-5)
    blocks = list(WindowEmbedder(resemblyzer, batch=4).iter_embed(speech, plan))
    assert [first for first, _ in blocks] == list(range(0, len(plan), 4))
    np.testing.assert_allclose(np.concatenate([r for _, r in blocks]), one, atol=2e-5)


def test_features_path_is_the_encoders_own_pipeline(resemblyzer, speech):
    plan = _plan(len(speech) / 16000)
    rows = WindowEmbedder(resemblyzer, mode="features").embed(speech, plan)
    for k, (s, e) in enumerate(plan):
        piece = speech[int(round(s * 16000)) : int(round(e * 16000))]
        if np.isnan(rows[k]).all():  # resemblyzer's own VAD keeps nothing of this window
            with pytest.raises(ValueError, match="no speech"):
                resemblyzer.features(piece)
            continue
        np.testing.assert_allclose(rows[k], resemblyzer.embed_batch([resemblyzer.features(piece)])[0], atol=2e-5)
    assert np.isfinite(rows).all(axis=1).sum() >= len(plan) - 1
    # a silent window cannot be embedded by resemblyzer's own VAD: a NaN row, not an error
    silent = np.concatenate([speech[:32000], np.zeros(32000, dtype=np.float32)])
    out = WindowEmbedder(resemblyzer, mode="features").embed(silent, windows_in_regions([(0, 1.5), (2.2, 3.7)]))
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


def test_embedder_argument_errors(resemblyzer):
    with pytest.raises(ValueError, match="unknown window embedding mode"):
        WindowEmbedder(resemblyzer, mode="frames")
    with pytest.raises(ValueError, match="gain"):
        WindowEmbedder(resemblyzer, gain="loud")
    assert WindowEmbedder(resemblyzer).describe() == {"mode": "mel", "gain": "window"}


@pytest.mark.parametrize("arch", ["ecapa", "resnet34"])
def test_wespeaker_windows_equal_per_window_forward(tmp_path, speech, arch):
    encoder = models.load(f"wespeaker:{make_wespeaker_dir(tmp_path, arch=arch, num_mel_bins=40 if arch == 'resnet34' else 80)}")
    plan = _plan(len(speech) / 16000)
    embedder = WindowEmbedder(encoder, batch=3)
    assert embedder.mode == "features"
    rows = embedder.embed(speech, plan)
    for k, (s, e) in enumerate(plan):
        feats = encoder.features(speech[int(round(s * 16000)) : int(round(e * 16000))])
        np.testing.assert_allclose(rows[k], encoder._forward(feats[None])[0], rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="Resemblyzer"):
        WindowEmbedder(encoder, mode="mel")


@pytest.fixture(scope="module")
def conversation(speech_corpus):
    # 30 s: shorter, a speaker has too few windows for the spectral count (15 neighbours each)
    return make_conversation(corpus_by_speaker(speech_corpus.path), num_speakers=2, seed=3, duration=30.0)


def test_diarize_audio_two_speakers(resemblyzer, conversation):
    result = diarize_audio(conversation.wav, conversation.sample_rate, resemblyzer, detailed=True)
    assert isinstance(result, Diarization)
    assert len(result.plan) == len(result.embeddings) == len(result.labels)
    score = diarization_error(conversation.reference, result.segments, collar=0.25)
    assert score.der < 0.15
    assert result.num_speakers == 2
    # the same windows re-clustered from "stored" arrays give the same segments
    labels, segments = diarize_windows(result.plan.starts, result.plan.ends, result.embeddings)
    assert segments == result.segments and np.array_equal(labels, result.labels)
    fixed = diarize_audio(conversation.wav, conversation.sample_rate, resemblyzer, num_speakers=3, method="ahc")
    assert speaker_count(fixed) == 3


def test_diarize_audio_at_another_rate(resemblyzer, conversation):
    from embstore.audio.io import resample

    wav = resample(conversation.wav, 16000, 22050)
    segments = diarize_audio(wav, 22050, resemblyzer, vad="webrtc")
    assert diarization_error(conversation.reference, segments, collar=0.25).der < 0.2


def test_no_speech_and_short_items(resemblyzer, speech):
    with pytest.raises(NoSpeech, match="no speech"):
        diarize_audio(np.zeros(16000 * 4, dtype=np.float32), 16000, resemblyzer)
    noise = (np.random.default_rng(0).standard_normal(16000 * 3) * 1e-4).astype(np.float32)
    with pytest.raises(NoSpeech, match="no speech"):
        diarize_audio(noise, 16000, resemblyzer)
    short = speech[16000:27200]  # 0.7 s of speech: one short window, one segment
    result = diarize_audio(short, 16000, resemblyzer, vad="none", detailed=True)
    assert len(result.plan) == 1 and result.plan.short.tolist() == [True]
    assert len(result.segments) == 1 and result.segments[0].speaker == "spk00"


def test_pipeline_argument_errors(resemblyzer, speech):
    from embstore.errors import ClusteringError, WindowSpecError

    with pytest.raises(WindowSpecError):
        diarize_audio(speech, 16000, resemblyzer, window="1.5:0")
    with pytest.raises(ClusteringError, match="not both"):
        diarize_audio(speech, 16000, resemblyzer, num_speakers=2, max_speakers=3)
