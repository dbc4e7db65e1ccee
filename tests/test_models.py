"""Model sources: every batched path against the plain per-item `embed_file` reference."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from embstore import models
from embstore.errors import ModelError
from embstore.vectors import finite_nonzero as check_finite
from embstore.eval.metrics import compute_eer, compute_min_dcf
from embstore.vectors import cosine_rows

torch = pytest.importorskip("torch")
from tests.wespeaker_dirs import make_wespeaker_dir  # noqa: E402

EXACT = 0.99999  # cosine of batched vs per-item fp32 embeddings (float rounding only)




def _write(path: Path, data: np.ndarray, rate: int) -> Path:
    import soundfile as sf

    sf.write(str(path), data, rate, subtype="PCM_16")
    return path


def _speechlike(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 100 + 20 * seed % 80 + 25 * np.sin(2 * np.pi * 0.5 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(pitch) / rate) / k for k in range(1, 10))
    envelope = 0.3 + 0.7 * np.abs(np.sin(2 * np.pi * 2.5 * t))
    return (0.08 * voiced * envelope + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # small forwards: a second intra-op thread buys little and, when other processes
    # share the two cores, spin-waiting threads cost far more than they give
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def wav_files(tmp_path_factory) -> list[Path]:
    """16 synthetic 16 kHz files of 1.2 s: WeSpeaker tests run without ../shared/data."""
    folder = tmp_path_factory.mktemp("wavs")
    return [_write(folder / f"item{i:02d}.wav", _speechlike(1.2, i), 16000) for i in range(16)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wespeaker")
    return {
        "resnet34": make_wespeaker_dir(root, "resnet34"),
        "ecapa": make_wespeaker_dir(root, "ecapa"),
        "campplus": make_wespeaker_dir(root, "campplus"),
        "eres2net": make_wespeaker_dir(root, "eres2net"),
    }


@pytest.fixture(scope="module")
def encoders(model_dirs) -> dict[str, models.Encoder]:
    return {arch: models.load(f"wespeaker:{d}") for arch, d in model_dirs.items()}


@pytest.fixture(scope="module")
def resemblyzer_encoder():
    pytest.importorskip("resemblyzer")
    return models.load("resemblyzer")


# ---------------------------------------------------------------- specs and errors


def test_models_package_does_not_import_torch() -> None:
    code = "import sys, embstore.models, embstore.audio.fbank, embstore.eval.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bogus", "unknown model spec"),
        ("wespeaker", "unknown model spec"),
        ("resemblyzer:extra", "unknown model spec"),
        ("onnx:", "unknown model spec"),
        ("wespeaker:/no/such/dir", "no such directory"),
        ("onnx:/no/such/model.onnx", "no such file"),
    ],
)
def test_bad_specs_fail_with_one_line(spec: str, message: str) -> None:
    with pytest.raises(ModelError) as info:
        models.load(spec)
    text = str(info.value)
    assert message in text and "\n" not in text
    if "unknown model spec" in text:
        assert "wespeaker:DIR" in text and "onnx:FILE" in text and "wespeaker-hub:NAME" in text


def test_bad_dtype_and_device() -> None:
    with pytest.raises(ModelError, match="dtype"):
        models.load("resemblyzer", dtype="int8")
    with pytest.raises(ModelError, match="device"):
        models.load("resemblyzer", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            models.load("resemblyzer", device="cuda:0")


def test_hub_download_failure_is_one_clear_line(tmp_path, monkeypatch) -> None:
    import requests

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'modelscope.cn'")

    monkeypatch.setenv("WESPEAKER_HOME", str(tmp_path))
    monkeypatch.setattr(requests, "get", offline)
    with pytest.raises(ModelError) as info:
        models.load("wespeaker-hub:english")
    text = str(info.value)
    assert text.startswith("wespeaker-hub:english: download failed") and "\n" not in text
    assert "wespeaker:DIR" in text
    # importing the hub must not have run wespeaker/__init__ (silero_vad, torchaudio)
    assert "torchaudio" not in sys.modules and "silero_vad" not in sys.modules

    with pytest.raises(ModelError, match="unknown name; known: .*campplus.*english"):
        models.load("wespeaker-hub:klingon")


def test_hub_uses_a_downloaded_directory(tmp_path, monkeypatch, model_dirs) -> None:
    # WeSpeaker's hub skips the download when config.yaml + avg_model.pt are present
    shutil.copytree(model_dirs["campplus"], tmp_path / "campplus")
    monkeypatch.setenv("WESPEAKER_HOME", str(tmp_path))
    encoder = models.load("wespeaker-hub:campplus")
    assert encoder.spec == "wespeaker-hub:campplus" and encoder.name == "wespeaker-hub-campplus"
    assert encoder.frontend["window_type"] == "povey" and encoder.frontend["int16_scale"] is False


# ---------------------------------------------------------------- resemblyzer


def test_resemblyzer_matches_the_package(shared_data, resemblyzer_encoder) -> None:
    from resemblyzer import VoiceEncoder, preprocess_wav

    package = VoiceEncoder("cpu", verbose=False)
    for path in sorted(shared_data.glob("*/*.flac"))[5::25]:  # 4 files, 4 speakers
        expected = package.embed_utterance(preprocess_wav(str(path)))
        ours = resemblyzer_encoder.embed_file(str(path))
        assert ours.shape == (256,) and ours.dtype == np.float32
        assert cosine_rows(ours, expected)[0] >= 0.999


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_resemblyzer_batch_equals_embed_file(shared_data, resemblyzer_encoder, batch_size: int) -> None:
    enc = resemblyzer_encoder
    paths = [str(p) for p in sorted(shared_data.glob("*/*.flac"))[:batch_size * 6 : 6]]
    spans = [(0.0, 2.0)] * batch_size  # equal lengths
    feats = [enc.features(enc.load(p, *s)) for p, s in zip(paths, spans)]
    batch = enc.embed_batch(feats)
    single = np.stack([enc.embed_file(p, *s) for p, s in zip(paths, spans)])
    assert batch.shape == (batch_size, enc.dim)
    assert cosine_rows(batch, single).min() >= EXACT


def test_resemblyzer_any_lengths_and_metadata(shared_data, resemblyzer_encoder) -> None:
    enc = resemblyzer_encoder
    assert enc.batching == "any" and enc.dim == 256 and enc.sample_rate == 16000
    paths = [str(p) for p in sorted(shared_data.glob("*/*.flac"))[:3]]
    spans = [(0.0, 1.0), (0.5, 4.0), (None, None)]
    wavs = [enc.load(p, *s) for p, s in zip(paths, spans)]
    feats = [enc.features(w) for w in wavs]
    assert [f.shape[1:] for f in feats] == [(160, 40)] * 3
    assert all(len(f) <= enc.feature_length(len(w)) for f, w in zip(feats, wavs))
    mixed = enc.embed_batch(feats)
    single = np.stack([enc.embed_file(p, *s) for p, s in zip(paths, spans)])
    assert cosine_rows(mixed, single).min() >= EXACT
    with pytest.raises(ValueError, match="silent"):
        enc.features(np.zeros(16000, dtype=np.float32))
    for key in ("partial_frames", "partial_rate", "vad", "sample_rate"):
        assert key in enc.frontend


def test_resemblyzer_fingerprint_follows_frontend(resemblyzer_encoder) -> None:
    from embstore.models.resemblyzer import ResemblyzerEncoder

    again = ResemblyzerEncoder()
    assert again.fingerprint == resemblyzer_encoder.fingerprint
    assert ResemblyzerEncoder(rate=1.0).fingerprint != resemblyzer_encoder.fingerprint


@pytest.mark.slow
@pytest.mark.exhaustive  # the default model's real EER runs through `embstore score` in test_score.py
def test_resemblyzer_eer_on_librispeech(shared_data, resemblyzer_encoder) -> None:
    """Quality floor of the default model: EER <= 1 % on 4950 trials of 100 utterances.

    All items go through one `embed_batch` (batching "any": exact, see the test above)
    rather than 100 `embed_file` calls: the same numbers in a third of the time.
    """
    enc = resemblyzer_encoder
    paths = sorted(shared_data.glob("*/*.flac"))
    assert len(paths) == 100
    vectors = enc.embed_batch([enc.features(enc.load(str(p))) for p in paths])
    assert check_finite(vectors).all()
    index = {p.stem: i for i, p in enumerate(paths)}
    # spot-check the batched vectors against the reference path
    assert cosine_rows(vectors[[0, 57]], np.stack([enc.embed_file(str(paths[i])) for i in (0, 57)])).min() >= EXACT
    scores, labels = [], []
    for line in (shared_data / "trials.txt").read_text().splitlines():
        a, b, label = line.split()
        scores.append(float(vectors[index[a]] @ vectors[index[b]]))
        labels.append(label == "target")
    assert len(scores) == 4950 and sum(labels) == 450
    eer = compute_eer(scores, labels)
    assert eer <= 0.01, f"EER {eer:.2%}"
    assert 0.0 <= compute_min_dcf(scores, labels) <= 0.2


# ---------------------------------------------------------------- WeSpeaker


@pytest.mark.parametrize("arch", ["resnet34", "ecapa", "campplus", "eres2net"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_wespeaker_batch_equals_embed_file(encoders, wav_files, arch: str, batch_size: int) -> None:
    if arch != "resnet34" and batch_size == 16:
        batch_size = 5  # the other families: B=16 adds time, not coverage
    enc = encoders[arch]
    paths = [str(p) for p in wav_files[:batch_size]]
    feats = [enc.features(enc.load(p)) for p in paths]
    assert len({len(f) for f in feats}) == 1 and len(feats[0]) == enc.feature_length(len(enc.load(paths[0])))
    batch = enc.embed_batch(feats)
    single = np.stack([enc.embed_file(p) for p in paths])
    assert batch.shape == (batch_size, enc.dim) and batch.dtype == np.float32
    assert check_finite(batch).all()
    assert cosine_rows(batch, single).min() >= EXACT


def test_wespeaker_frontend_follows_family(encoders) -> None:
    for arch in ("resnet34", "ecapa"):
        assert encoders[arch].frontend["window_type"] == "hamming" and encoders[arch].frontend["int16_scale"]
    for arch in ("campplus", "eres2net"):
        assert encoders[arch].frontend["window_type"] == "povey" and not encoders[arch].frontend["int16_scale"]
    enc = encoders["resnet34"]
    assert enc.frontend["num_mel_bins"] == 80 and enc.frontend["cmn"] and enc.sample_rate == 16000
    assert enc.describe()["dim"] == 256 and enc.frontend["max_frames"] == 6000


def test_wespeaker_mixed_lengths(encoders, model_dirs, wav_files) -> None:
    paths = [str(p) for p in wav_files[:3]]
    spans = [(0.0, 0.6), (0.1, 1.2), (0.0, 0.9)]
    for arch in ("resnet34", "ecapa"):
        enc = encoders[arch]
        feats = [enc.features(enc.load(p, *s)) for p, s in zip(paths, spans)]
        if enc.batching == "masked":
            single = np.stack([enc.embed_file(p, *s) for p, s in zip(paths, spans)])
            assert cosine_rows(enc.embed_batch(feats), single).min() >= EXACT
    plain = models.load(f"wespeaker:{model_dirs['ecapa']}", masked=False)
    assert plain.batching == "equal"
    feats = [plain.features(plain.load(p, *s)) for p, s in zip(paths, spans)]
    with pytest.raises(ValueError, match="same number of frames"):
        plain.embed_batch(feats)


def test_wespeaker_long_items_are_windowed(model_dirs, wav_files) -> None:
    from embstore.models.fbank_encoder import long_item_windows

    assert long_item_windows(100, 6000) == [(0, 100)]
    assert long_item_windows(250, 100) == [(0, 100), (100, 200), (150, 250)]
    assert long_item_windows(300, 100) == [(0, 100), (100, 200), (200, 300)]
    assert long_item_windows(300, 0) == [(0, 300)]
    enc = models.load(f"wespeaker:{model_dirs['ecapa']}", max_frames=40, masked=False)
    path = str(wav_files[0])
    feats = enc.features(enc.load(path))  # 118 frames -> windows 0-40, 40-80, 78-118
    windows = long_item_windows(len(feats), 40)
    assert len(windows) == 3 and windows[-1][1] == len(feats)
    manual = np.mean([enc.embed_batch([feats[a:b]])[0] for a, b in windows], axis=0)
    reference = enc.embed_file(path)
    assert cosine_rows(reference, manual)[0] >= EXACT
    twice = enc.embed_batch([feats, enc.features(enc.load(str(wav_files[1])))])
    assert cosine_rows(twice[0], reference)[0] >= EXACT
    assert enc.frontend["max_frames"] == 40
    whole = models.load(f"wespeaker:{model_dirs['ecapa']}")
    assert whole.fingerprint != enc.fingerprint
    assert cosine_rows(whole.embed_file(path), reference)[0] < EXACT  # the policy changes numbers


def test_wespeaker_fingerprints(tmp_path, model_dirs, encoders) -> None:
    base = encoders["ecapa"]
    again = models.load(f"wespeaker:{model_dirs['ecapa']}")
    assert again.fingerprint == base.fingerprint and len(base.fingerprint) == 24
    other_weights = make_wespeaker_dir(tmp_path, "ecapa", seed=1)
    assert models.load(f"wespeaker:{other_weights}").fingerprint != base.fingerprint
    # same weights, another frontend: a config override of the window
    other_frontend = tmp_path / "ecapa-povey"
    shutil.copytree(model_dirs["ecapa"], other_frontend)
    config = yaml.safe_load((other_frontend / "config.yaml").read_text())
    config["embstore"] = {"window_type": "povey"}
    (other_frontend / "config.yaml").write_text(yaml.safe_dump(config))
    povey = models.load(f"wespeaker:{other_frontend}")
    assert povey.frontend["window_type"] == "povey" and povey.fingerprint != base.fingerprint
    # the checkpoint may be named explicitly
    named = models.load(f"wespeaker:{model_dirs['ecapa'] / 'avg_model.pt'}")
    assert named.fingerprint == base.fingerprint


def test_wespeaker_checkpoint_problems(tmp_path, model_dirs) -> None:
    source = model_dirs["ecapa"]
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    state = torch.load(broken / "avg_model.pt", weights_only=True)
    del state["linear.weight"]
    torch.save(state, broken / "avg_model.pt")
    with pytest.raises(ModelError, match="1 weights missing"):
        models.load(f"wespeaker:{broken}")

    mismatched = tmp_path / "mismatched"
    shutil.copytree(source, mismatched)
    config = yaml.safe_load((mismatched / "config.yaml").read_text())
    config["model_args"]["channels"] = 32
    (mismatched / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ModelError, match="does not match config"):
        models.load(f"wespeaker:{mismatched}")

    for i, (edit, message) in enumerate((
        ({"model": "NoSuchNet"}, "not in WeSpeaker's zoo"),
        ({"dataset_args": {"frontend": "s3prl"}}, "not supported"),
    )):
        folder = tmp_path / f"edited{i}"
        shutil.copytree(source, folder)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config.update(edit)
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        with pytest.raises(ModelError, match=message):
            models.load(f"wespeaker:{folder}")

    no_config = tmp_path / "no-config"
    no_config.mkdir()
    shutil.copy(source / "avg_model.pt", no_config / "model.pt")
    with pytest.raises(ModelError, match="no config.yaml"):
        models.load(f"wespeaker:{no_config}")


def test_wespeaker_resamples_and_mixes_down(tmp_path, encoders) -> None:
    from embstore.audio.io import resample, resampled_length

    enc = encoders["ecapa"]
    mono16 = _speechlike(1.0, 7)
    stereo = _write(tmp_path / "stereo.wav", np.stack([mono16, mono16], axis=1), 16000)
    mono = _write(tmp_path / "mono.wav", mono16, 16000)
    assert cosine_rows(enc.embed_file(str(stereo)), enc.embed_file(str(mono)))[0] >= EXACT
    mono8k = _speechlike(1.0, 8, rate=8000)
    low = _write(tmp_path / "eight.wav", np.stack([mono8k, 0.5 * mono8k], axis=1), 8000)
    wav = enc.load(str(low))
    assert len(wav) == resampled_length(8000, 8000, 16000) == 16000
    expected = resample((0.75 * mono8k).astype(np.float32), 8000, 16000)
    np.testing.assert_allclose(wav, expected, atol=2e-4)  # 16-bit quantisation of the file
    assert cosine_rows(enc.embed_file(str(low)), enc.embed_batch([enc.features(wav)]))[0] >= EXACT


def test_wespeaker_device_features(encoders, wav_files) -> None:
    enc = encoders["resnet34"]
    wavs = [enc.load(str(p)) for p in wav_files[:4]]
    on_device = enc.features_batch(wavs)
    assert tuple(on_device.shape) == (4, enc.feature_length(len(wavs[0])), 80)
    reference = enc.embed_batch([enc.features(w) for w in wavs])
    assert cosine_rows(enc.embed_batch(on_device), reference).min() >= 0.9999


def test_wespeaker_bf16_runs(model_dirs, encoders, wav_files) -> None:
    enc = models.load(f"wespeaker:{model_dirs['ecapa']}", dtype="bf16")
    assert enc.fingerprint != encoders["ecapa"].fingerprint  # precision is part of the identity
    feats = [enc.features(enc.load(str(p), 0, 0.5)) for p in wav_files[:2]]
    low = enc.embed_batch(feats)
    assert low.dtype == np.float32 and check_finite(low).all()
    assert cosine_rows(low, encoders["ecapa"].embed_batch(feats)).min() >= 0.95


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_wespeaker_on_cuda(model_dirs, encoders, wav_files) -> None:
    cpu = encoders["resnet34"]
    feats = [cpu.features(cpu.load(str(p))) for p in wav_files[:4]]
    reference = cpu.embed_batch(feats)
    gpu = models.load(f"wespeaker:{model_dirs['resnet34']}", device="cuda")
    assert gpu.fingerprint == cpu.fingerprint  # the device does not change identity
    assert cosine_rows(gpu.embed_batch(feats), reference).min() >= 0.9999
    on_device = gpu.features_batch([gpu.load(str(p)) for p in wav_files[:4]])
    assert on_device.is_cuda and cosine_rows(gpu.embed_batch(on_device), reference).min() >= 0.9999
    for dtype in ("bf16", "fp16"):
        low = models.load(f"wespeaker:{model_dirs['resnet34']}", device="cuda", dtype=dtype)
        assert cosine_rows(low.embed_batch(feats), reference).min() >= 0.99


# ---------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, model_dirs, encoders) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    folder = tmp_path_factory.mktemp("onnx")
    enc = encoders["resnet34"]

    class Export(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, feats):
            out = self.model(feats)
            return out[-1] if isinstance(out, tuple) else out

    path = folder / "resnet34.onnx"
    torch.onnx.export(
        Export(enc.model).eval(),
        (torch.zeros(1, 200, 80),),
        str(path),
        input_names=["feats"],
        output_names=["embs"],
        dynamic_axes={"feats": {0: "B", 1: "T"}, "embs": {0: "B"}},
        opset_version=17,
        dynamo=False,
    )
    shutil.copy(model_dirs["resnet34"] / "config.yaml", folder / "config.yaml")
    return path


def test_onnx_matches_torch(onnx_export, encoders, wav_files) -> None:
    torch_enc = encoders["resnet34"]
    enc = models.load(f"onnx:{onnx_export}")
    assert enc.dim == 256 and enc.batching == "equal" and enc.frontend["window_type"] == "hamming"
    paths = [str(p) for p in wav_files[:3]]
    single = np.stack([enc.embed_file(p) for p in paths])
    reference = np.stack([torch_enc.embed_file(p) for p in paths])
    assert cosine_rows(single, reference).min() >= EXACT
    batch = enc.embed_batch([enc.features(enc.load(p)) for p in paths])
    assert cosine_rows(batch, single).min() >= EXACT
    with pytest.raises(ValueError, match="same number of frames"):
        enc.embed_batch([enc.features(enc.load(paths[0], 0, 0.5)), enc.features(enc.load(paths[1]))])


def test_onnx_without_config_and_fingerprint(tmp_path, onnx_export) -> None:
    bare = tmp_path / "bare.onnx"
    shutil.copy(onnx_export, bare)
    with_config = models.load(f"onnx:{onnx_export}")
    without = models.load(f"onnx:{bare}")
    assert without.frontend["window_type"] == "hamming" and without.frontend["int16_scale"]
    assert without.frontend["num_mel_bins"] == 80
    assert without.fingerprint == with_config.fingerprint  # same bytes, same (default) frontend
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"embstore": {"window_type": "povey"}}))
    assert models.load(f"onnx:{bare}").fingerprint != with_config.fingerprint
    with pytest.raises(ModelError, match="fp32 only"):
        models.load(f"onnx:{bare}", dtype="bf16")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        models.load(f"onnx:{garbage}")


# ---------------------------------------------------------------- metrics


def test_eer_and_min_dcf() -> None:
    assert compute_eer([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 0.0
    assert compute_eer([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 1.0
    # one target below one non-target among 4 of each: the curves cross at 1/4
    scores = [0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.05]
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    assert compute_eer(scores, labels) == pytest.approx(0.25)
    # ties are one threshold: all-equal scores are chance level
    assert compute_eer([0.5] * 6, [1, 0, 1, 0, 1, 0]) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    labels = rng.random(4000) < 0.1
    scores = rng.normal(labels * 2.0, 1.0)
    eer = compute_eer(scores, labels)
    assert 0.14 < eer < 0.18  # two unit Gaussians 2 apart: Phi(-1) = 0.159
    # minDCF by brute force over all thresholds
    p = 0.01
    costs = []
    for t in np.concatenate([np.unique(scores), [np.inf]]):
        miss = np.mean(scores[labels] < t)
        fa = np.mean(scores[~labels] >= t)
        costs.append(miss * p + fa * (1 - p))
    assert compute_min_dcf(scores, labels, p_target=p) == pytest.approx(min(costs) / p)
    assert compute_min_dcf(scores, labels, p_target=0.05) <= 1.0
    with pytest.raises(ValueError):
        compute_eer([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError):
        compute_eer([0.1, np.nan], [1, 0])
