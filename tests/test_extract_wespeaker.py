"""The pipeline with a (random, small) WeSpeaker model: every batching mode stays exact."""

import numpy as np
import pytest

import embstore
from embstore.vectors import cosine_rows
from tests.audio_factory import write
from tests.wespeaker_dirs import make_wespeaker_dir




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("ws")
    model_dir = make_wespeaker_dir(base / "models", arch="ecapa")
    root = base / "root"
    paths = []
    # mixed lengths, some equal, one at another rate and one stereo
    for k, seconds in enumerate([1.0, 1.0, 1.0, 1.37, 1.52, 2.01, 2.013, 0.8]):
        paths.append(write(root / "ds" / f"spk{k % 3}" / f"u{k}.wav", seconds, pitch=100 + 20 * k, seed=k))
    paths.append(write(root / "ds" / "spk0" / "hi-rate.wav", 1.2, rate=44100, seed=50))
    paths.append(write(root / "ds" / "spk1" / "stereo.wav", 1.1, channels=2, seed=51))
    return f"wespeaker:{model_dir}", root, paths


@pytest.fixture(scope="module")
def reference(setup):
    from embstore.models import load

    spec, root, paths = setup
    encoder = load(spec)
    return {str(p.relative_to(root).with_suffix("")): encoder.embed_file(str(p)) for p in paths}, encoder


# the default suite keeps one run per path (device features on torch's masked batches,
# ONNX Runtime with trimming); the other combinations are exhaustive
@pytest.mark.parametrize("features,trim,runtime,batching", [
    pytest.param("cpu", 0, "torch", "auto", marks=pytest.mark.exhaustive), ("device", 0, "torch", "auto"),
    pytest.param("cpu", 0, "torch", "equal", marks=pytest.mark.exhaustive),
    pytest.param("cpu", 0, "onnx", "auto", marks=pytest.mark.exhaustive), ("cpu", 8, "onnx", "auto"),
])
def test_wespeaker_pipeline_equals_embed_file(tmp_path, setup, reference, features, trim, runtime, batching):
    spec, root, _ = setup
    ref, encoder = reference
    st = embstore.open(tmp_path / "s")
    st.scan([root])
    summary = st.extract(model=spec, device="cpu", features=features, max_trim_frames=trim, batch_frames=2000,
                         runtime=runtime, batching=batching)
    assert summary.failed == 0 and summary.done == len(ref)
    assert summary.features == features
    assert summary.runtime == ("onnxruntime" if runtime == "onnx" else "torch")
    ids, vectors = st.embeddings()
    cos = cosine_rows(vectors, np.stack([ref[i] for i in ids]))
    if trim:
        assert cos.min() >= 0.999  # trimming a few frames is the documented fidelity trade
    else:
        assert cos.min() >= 0.99999, (summary.batching, cos.min())
    if runtime == "onnx":  # ONNX graphs batch equal lengths only
        assert summary.batching == "equal" or summary.mean_batch_items >= 1
    if batching == "equal":
        assert summary.batching == "equal" and summary.padding_overhead == 0
    elif runtime == "torch" and encoder.batching == "masked":
        assert summary.mean_batch_items > 1 and summary.padding_overhead > 0
