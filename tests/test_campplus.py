"""embstore's own CAM++ (embstore.models.campplus), the default model: the same network as
WeSpeaker's zoo, its real weights, exact padded batches, and the runtimes agreeing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embstore.models import load
from embstore.models.campplus import build_campplus
from embstore.models.openvino import cpu_bf16_support
from embstore.vectors import cosine_rows
from tests.conftest import CAMPPLUS_BF16_MIN_COS

BF16, BF16_WHY = cpu_bf16_support()


def _zoo_campplus():
    from embstore.models._wespeaker_import import import_wespeaker

    try:
        return import_wespeaker("models.campplus").CAMPPlus
    except ImportError:
        pytest.skip("WeSpeaker's zoo is not installed (pip install --no-deps wespeaker-unofficial)")


@pytest.mark.parametrize("frames", [3, 60, 199, 200, 437])
def test_the_network_equals_wespeakers_zoo_for_the_same_weights(frames):
    torch.manual_seed(frames)
    zoo = _zoo_campplus()(feat_dim=80, embed_dim=192).eval()
    for module in zoo.modules():  # BatchNorm statistics that are not the identity
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    ours = build_campplus({"feat_dim": 80, "embed_dim": 192, "pooling_func": "TSTP"}).eval()
    ours.load_state_dict(zoo.state_dict(), strict=True)  # same names, same shapes
    x = torch.randn(2, frames, 80)
    with torch.inference_mode():
        a, b = ours(x), zoo(x)
    assert torch.abs(a - b).max() <= 1e-5 * torch.abs(b).max()


def test_bad_model_args_are_refused():
    with pytest.raises(ValueError, match="unsupported CAM\\+\\+ model_args two_stream"):
        build_campplus({"two_stream": True})
    with pytest.raises(ValueError, match="only pooling_func TSTP"):
        build_campplus({"pooling_func": "ASTP"})


@pytest.fixture(scope="module")
def campplus():
    from tests.conftest import pretrained_weights

    if pretrained_weights("campplus") is None:
        pytest.skip("CAM++ weights not fetched (make setup, or embstore models fetch campplus)")
    return load("campplus")


def test_the_real_weights_load_strictly(campplus, campplus_weights):
    state = torch.load(campplus_weights, map_location="cpu", weights_only=True)
    assert len(state) == 937 and set(state) == set(campplus.model.state_dict())
    assert campplus.dim == 192 and campplus.capabilities.batching == "masked"
    frontend = campplus.frontend
    assert (frontend["window_type"], frontend["num_mel_bins"], frontend["dither"]) == ("povey", 80, 0.0)


def _clips(speech_corpus, seconds=(0.4, 1.7, 4.0)):
    path = str(speech_corpus.files()[0])
    return [(path, 0.0, s) for s in seconds]


def test_padded_batches_of_mixed_lengths_equal_each_item_alone(campplus, speech_corpus):
    clips = _clips(speech_corpus, (0.4, 1.0, 1.7, 2.6, 4.0))  # under and over the 100-frame segments
    feats = [campplus.features(campplus.load(p, start, end)) for p, start, end in clips]
    batched = campplus.embed_batch(feats)  # one padded, masked batch of mixed lengths
    alone = np.stack([campplus.embed_file(p, start, end) for p, start, end in clips])
    assert np.isfinite(batched).all()
    assert cosine_rows(batched, alone).min() >= 0.99999


def test_onnx_openvino_and_torch_agree(campplus, speech_corpus):
    from embstore.models.onnx import export_onnx

    others = [load("onnx:" + export_onnx(campplus))]
    try:
        others.append(load("openvino:campplus", threads=1))
    except Exception as exc:  # OpenVINO is an extra
        if "needs OpenVINO" not in str(exc):
            raise
    for path, start, end in _clips(speech_corpus):
        reference = campplus.embed_file(path, start, end)
        for other in others:
            got = other.embed_file(path, start, end)
            assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max(), (other.name, end)


@pytest.mark.skipif(not BF16, reason=f"no bf16 here: {BF16_WHY}")
def test_bf16_on_openvino_runs_everywhere_in_bf16_and_stays_close(campplus, speech_corpus):
    bf16 = load("openvino:campplus", dtype="bf16", threads=1)
    # CAM++ keeps no f32 stem (openvino.f32_stem_pays): the stem halves bf16's speed-up here
    assert bf16._run.stages == ["bf16"] and bf16.frontend["bf16_layers"] == "all"
    files = sorted(speech_corpus.files(), key=lambda p: p.stat().st_size)
    for path in (files[0], files[len(files) // 2], files[-1]):  # 2.0 s, ~6 s, 22.8 s
        got, reference = bf16.embed_file(str(path)), campplus.embed_file(str(path))
        assert cosine_rows(got[None], reference[None])[0] >= CAMPPLUS_BF16_MIN_COS


# The default model's EER on the shared trials through `embstore score`: tests/test_score.py
# (test_real_eer_and_audio_search_with_the_default_model), which extracts the corpus once.


def test_the_store_with_device_features_and_masked_batches_equals_embed_file(tmp_path, campplus, speech_corpus):
    import embstore

    root = tmp_path / "root" / "ds" / "spk"
    root.mkdir(parents=True)
    files = sorted(speech_corpus.files(), key=lambda p: p.stat().st_size)[:6]  # the shortest: mixed lengths
    for f in files:
        (root / f.name).symlink_to(f)
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "root"])
    # torch on the "device" (the CPU here): fbank computed by torch, mixed lengths padded and masked
    summary = st.extract(device="cpu", features="device", runtime="torch", batch_frames=3000, workers=1)
    assert summary.failed == 0 and summary.features == "device" and summary.batching == "masked"
    assert summary.mean_batch_items > 1 and summary.padding_overhead > 0
    ids, vectors = st.embeddings()
    reference = np.stack([campplus.embed_file(str(root / (i.rsplit("/", 1)[-1] + ".flac"))) for i in ids])
    assert cosine_rows(vectors, reference).min() >= 0.99999
    st.close()
