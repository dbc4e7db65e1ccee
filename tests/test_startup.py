"""Start-up: model cards (plan a run without loading the model), length rules, the
ONNX export in the user cache, and workers that check what they loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import embstore
from embstore.errors import ExtractionError
from embstore.extract.messages import WorkerSetup
from embstore.extract.worker import open_encoder
from embstore.audio.fbank import FbankConfig, num_frames
from embstore.models import cards, load
from embstore.models.lengths import FbankLength, PartialsLength, rule_from_dict, rule_to_dict
from tests.audio_factory import make_tree
from tests.wespeaker_dirs import make_wespeaker_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_wespeaker_dir(tmp_path_factory.mktemp("models"), arch="resnet18", num_mel_bins=40, embed_dim=32)


def test_partials_rule_equals_resemblyzers_own_slicing():
    from resemblyzer.voice_encoder import VoiceEncoder

    rule = PartialsLength.of(16000, 10, 160, 1.3, 0.75, 30)
    for n in [*range(0, 20000, 37), *range(20000, 700000, 4999)]:
        cut = n - n % 480
        assert rule(n) == len(VoiceEncoder.compute_partial_slices(cut, 1.3, 0.75)[1]), n


def test_fbank_rule_equals_kaldi_frames_and_round_trips():
    config = FbankConfig(sample_rate=8000, frame_length_ms=25, frame_shift_ms=10)
    rule = FbankLength(config.window_size, config.window_shift)
    assert [rule(n) for n in range(0, 3000, 13)] == [num_frames(n, config) for n in range(0, 3000, 13)]
    assert rule_from_dict(rule_to_dict(rule)) == rule
    with pytest.raises(ValueError):
        rule_from_dict({"kind": "nonsense"})


def test_card_round_trip_and_invalidation(model_dir):
    spec = f"wespeaker:{model_dir}"
    encoder = load(spec)
    card = cards.remember(spec, "fp32", encoder)
    again = cards.lookup(spec, "fp32")
    assert again == card
    assert again.fingerprint == encoder.fingerprint
    assert again.capabilities == encoder.capabilities
    assert again.length_rule(16000) == encoder.feature_length(16000)
    assert cards.lookup(spec, "bf16") is None  # another dtype is another card
    # new weights (same name): a different key, never the old card
    checkpoint = model_dir / "avg_model.pt"
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cards.lookup(spec, "fp32") is None
    # a damaged card is ignored, not trusted
    card = cards.remember(spec, "fp32", encoder)
    key = cards.card_key(spec, "fp32")
    path = Path(os.environ["EMBSTORE_CACHE"]) / "cards" / f"{key}.json"
    path.write_text("{not json")
    assert cards.lookup(spec, "fp32") is None


def test_a_known_model_is_planned_without_torch(tmp_path, model_dir):
    """Second run on a new store: the card and the ONNX export come from the user cache,
    so the parent never imports torch (a second of start-up)."""
    make_tree(tmp_path / "audio", speakers=1, per_speaker=2, seconds=0.5)
    first = embstore.open(tmp_path / "s1")
    first.scan([tmp_path / "audio"])
    assert first.extract(model=f"wespeaker:{model_dir}").done == 2
    first.close()
    code = f"""
import sys, json
import embstore
from embstore.extract.options import ExtractOptions
from embstore.extract.plan import plan_extraction
st = embstore.open({str(tmp_path / 's2')!r})
st.scan([{str(tmp_path / 'audio')!r}])
plan = plan_extraction(st.manifest, ExtractOptions(model={f'wespeaker:{model_dir}'!r}))
print(json.dumps({{"torch": "torch" in sys.modules, "spec": plan.worker_spec, "left": plan.left}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=os.environ,
                         check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["left"] == 2
    assert info["spec"].startswith("onnx:") and info["spec"].startswith("onnx:" + os.environ["EMBSTORE_CACHE"])
    assert info["torch"] is False


def test_worker_refuses_a_model_that_changed(model_dir):
    setup = WorkerSetup(
        model_spec=f"wespeaker:{model_dir}", model_id=1, device="cpu", dtype="fp32", batching="equal",
        batch_frames=100, claim_items=4, loader_workers=1, threads=1, lease_seconds=60, fingerprint="0" * 24,
    )
    with pytest.raises(ExtractionError, match="fingerprint"):
        open_encoder(setup)
