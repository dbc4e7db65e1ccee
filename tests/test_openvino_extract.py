"""Extraction on OpenVINO: `--dtype bf16` on CPU picks it where the CPU computes bf16,
says why not elsewhere; `--runtime openvino` at fp32; its rows are a model of their own."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import embstore
from embstore.errors import ExtractionError
from embstore.extract import plan
from embstore.models.openvino import cpu_bf16_support
from tests.audio_factory import make_tree
from tests.conftest import CAMPPLUS_BF16_MIN_COS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")


@pytest.fixture()
def store(tmp_path):
    make_tree(tmp_path / "audio", speakers=2, per_speaker=2, seconds=1.2)
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "audio"])
    yield st
    st.close()


def test_bf16_on_cpu_runs_on_openvino_as_its_own_model(tmp_path, shared_data):
    if not cpu_bf16_support()[0]:
        pytest.skip(cpu_bf16_support()[1])
    import shutil

    for path in sorted(shared_data.glob("*/*.flac"))[:40:10]:  # 4 real utterances, 4 speakers
        target = tmp_path / "real" / "libri" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    store = embstore.open(tmp_path / "real-store")
    store.scan([tmp_path / "real"])
    fp32 = store.extract()
    bf16 = store.extract(dtype="bf16")
    assert bf16.runtime == "openvino" and bf16.done == 4 and not bf16.error
    assert bf16.fingerprint != fp32.fingerprint and len(store.models()) == 2
    _, a = store.embeddings(model=fp32.model)
    _, b = store.embeddings(model=bf16.model)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= CAMPPLUS_BF16_MIN_COS  # the default model in bf16 (see its definition)
    assert store.extract(dtype="bf16").nothing_to_do
    assert store.verify(model=bf16.model).ok


def test_fp32_on_openvino_when_asked(store):
    summary = store.extract(runtime="openvino")
    assert summary.runtime == "openvino" and summary.done == 4
    assert "openvino" in summary.model
    assert store.status().models[summary.model]["last_run"]["runtime"] == "openvino"


def test_bf16_where_the_cpu_lacks_it_says_why(store, monkeypatch):
    monkeypatch.setattr(plan, "cpu_bf16_support", lambda: (False, "this CPU has neither AMX nor AVX512-BF16"))
    with pytest.raises(ExtractionError, match="bf16 is not offered on this CPU: this CPU has neither"):
        store.extract(dtype="bf16")
    # torch's own autocast stays available when asked for by name
    assert store.extract(dtype="bf16", runtime="torch").runtime == "torch"


def test_openvino_refuses_what_it_cannot_run(store):
    with pytest.raises(ExtractionError, match="fp32 or bf16"):
        store.extract(runtime="openvino", dtype="fp16")
