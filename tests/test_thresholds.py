"""Cosine thresholds are the model's own: each clustering default follows the store's model."""

from __future__ import annotations

import numpy as np
import pytest

from embstore.clustering.corpus import DEFAULT_THRESHOLD, cluster_corpus
from embstore.models.thresholds import FALLBACK, TUNED, thresholds_for, tuned_for


@pytest.mark.parametrize("name", [
    "campplus-zh-en-common", "campplus-zh-en-common+w1.5:0.75+silero", "campplus-zh-en-common-openvino-bf16",
    "campplus-zh-en-common-openvino-fp32+webrtc",
])
def test_windows_and_runtimes_share_the_models_thresholds(name):
    assert tuned_for(name) is TUNED["campplus-zh-en-common"]


def test_an_unknown_model_has_no_tuned_values_and_falls_back():
    assert tuned_for("wespeaker-resnet34-x") is None
    assert thresholds_for("wespeaker-resnet34-x") is FALLBACK and FALLBACK.diarize_ahc == 0.6
    assert FALLBACK.corpus_cluster == 0.725
    assert thresholds_for("resemblyzer-ge2e+w1.5:0.75+silero").diarize_ahc == 0.6
    assert thresholds_for("campplus-zh-en-common+w1.5:0.75+silero").diarize_ahc == 0.3


def test_the_corpus_cut_without_a_threshold_is_the_callers_default():
    # two groups at cosine ~0.6 from each other: one cluster at a 0.5 cut, two at 0.725
    rng = np.random.default_rng(0)
    base = rng.standard_normal(16)
    other = 0.6 * base / np.linalg.norm(base) + 0.8 * np.linalg.qr(np.stack([base, rng.standard_normal(16)]).T)[0][:, 1]
    x = np.concatenate([base + 0.01 * rng.standard_normal((5, 16)), other * np.linalg.norm(base)
                        + 0.01 * rng.standard_normal((5, 16))]).astype(np.float32)
    assert cluster_corpus(x).num_clusters == 2 and DEFAULT_THRESHOLD == 0.725
    assert cluster_corpus(x, default_threshold=0.5).num_clusters == 1
    assert cluster_corpus(x, threshold=0.725, default_threshold=0.5).num_clusters == 2
