"""The GPU path. Skipped where there is no CUDA device; run on a GPU machine with
`python -m pytest tests/test_cuda.py`."""

import numpy as np
import pytest

import embstore
from embstore.vectors import cosine_rows
from tests.audio_factory import make_tree, write
from tests.wespeaker_dirs import make_wespeaker_dir

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]




@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("cuda")
    files = make_tree(base / "root", speakers=3, per_speaker=4, seconds=1.5)
    files.append(write(base / "root" / "ds" / "spk0" / "rate.wav", 2.2, rate=8000, seed=9))
    model_dir = make_wespeaker_dir(base / "models", arch="resnet34")
    return base / "root", files, f"wespeaker:{model_dir}"


def test_fbank_batch_on_cuda_matches_cpu_reference(corpus):
    from embstore.audio.fbank import fbank, fbank_batch
    from embstore.models import load

    _, files, spec = corpus
    encoder = load(spec)
    wav = encoder.load(str(files[0]))
    ref = fbank(wav, encoder.fbank_config)
    got = fbank_batch(torch.from_numpy(wav)[None].cuda(), encoder.fbank_config)[0].cpu().numpy()
    assert np.abs(got - ref).max() <= 1e-3


@pytest.mark.parametrize("features", ["device", "cpu"])
def test_cuda_extraction_equals_embed_file(tmp_path, corpus, features):
    from embstore.models import load

    root, files, spec = corpus
    st = embstore.open(tmp_path / "s")
    st.scan([root])
    summary = st.extract(model=spec, device="cuda", features=features)
    assert summary.failed == 0 and summary.done == len(files)
    ids, vectors = st.embeddings()
    encoder = load(spec)  # the CPU reference path
    by_id = {str(f.relative_to(root).with_suffix("")): f for f in files}
    reference = np.stack([encoder.embed_file(str(by_id[i])) for i in ids])
    # fp32 is strict on CUDA too (TF32 off), but GPU kernels round differently from CPU ones
    assert cosine_rows(vectors, reference).min() >= 0.9999


def test_fp32_masked_batches_are_exact_and_tf32_is_its_own_close_model(corpus):
    from embstore.models import load

    _, files, spec = corpus
    fp32 = load(spec, device="cuda")  # strict fp32: TF32 off for the call, cuDNN included
    feats = [fp32.features(fp32.load(str(f))) for f in files]
    assert fp32.batching == "masked" and len({len(f) for f in feats}) > 1
    single = np.stack([fp32.embed_file(str(f)) for f in files])
    assert cosine_rows(fp32.embed_batch(feats), single).min() >= 0.99999
    tf32 = load(spec, device="cuda", dtype="tf32")
    assert tf32.fingerprint != fp32.fingerprint
    assert cosine_rows(tf32.embed_batch(feats), single).min() >= 0.999


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus(tmp_path, corpus):
    root, files, spec = corpus
    st = embstore.open(tmp_path / "s")
    st.scan([root])
    summary = st.extract(model=spec, gpus="0,1")
    assert summary.done == len(files) and sorted(set(summary.devices)) == ["cuda:0", "cuda:1"]
