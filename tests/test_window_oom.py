"""Out of memory while embedding one item's windows outside a run (`WindowEmbedder.iter_embed`
/ `embed`, behind `verify --deep`, `similar --audio` and queries by audio): a block that
does not fit is embedded in halves, as the extraction worker's `ItemEmbedder` does, to
the same vectors as without the fault; later blocks start at the size that fitted; a
single window that does not fit raises. The fault is the worker's own hook
(EMBSTORE_FAULT_OOM_ABOVE, `embstore.segments.oom`) or an encoder that raises as torch
does on a full device.

Synthetic voices only (embstore.synthetic): no ../shared/data needed.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pytest

from embstore.extract.faults import OOM_ABOVE as WORKER_OOM_ABOVE
from embstore.models.registry import load
from embstore.segments.oom import OOM_ABOVE, embed_halving, is_out_of_memory
from embstore.segments.policy import Cutting
from embstore.segments.window_embed import WindowEmbedder
from embstore.segments.windows import windows_in_regions
from embstore.synthetic import voice

RATE = 16000


@pytest.fixture(scope="module")
def resemblyzer():
    return load("resemblyzer")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return voice(12.0, RATE, pitch=130.0, seed=7).astype(np.float32)


class OutOfMemoryError(RuntimeError):
    """Named as torch's `torch.cuda.OutOfMemoryError` is (no CUDA needed)."""


def _plan(wav: np.ndarray):
    duration = len(wav) / RATE
    return windows_in_regions([(0.0, duration)], 0.5, 0.25, duration)  # ~47 windows


def test_the_worker_and_the_embedder_share_one_hook():
    assert WORKER_OOM_ABOVE == OOM_ABOVE == "EMBSTORE_FAULT_OOM_ABOVE"


def _small_device(encoder: Any, room: int, monkeypatch) -> None:
    """The encoder's forwards fail as a full device's do above `room` windows."""
    for name in ("embed_packed_windows", "embed_batch"):
        forward = getattr(encoder, name)

        def limited(feats: Sequence[Any], forward=forward) -> np.ndarray:
            if len(feats) > room:
                raise OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return forward(feats)

        monkeypatch.setattr(encoder, name, limited)


@pytest.mark.parametrize("fault", ["hook", "device"])
@pytest.mark.parametrize("mode", ["mel", "features"])
def test_out_of_memory_above_a_block_size_gives_the_same_vectors(resemblyzer, speech, mode, fault, monkeypatch):
    plan = _plan(speech)
    assert len(plan) > 32
    clean = WindowEmbedder(resemblyzer, mode=mode, batch=32).embed(speech, plan)
    # every block of 32 runs out of memory, halved to 4
    if fault == "hook":
        monkeypatch.setenv(OOM_ABOVE, "5")
    else:
        _small_device(resemblyzer, 5, monkeypatch)
    embedder = WindowEmbedder(resemblyzer, mode=mode, batch=32)
    faulty = embedder.embed(speech, plan)
    assert faulty.shape == clean.shape == (len(plan), resemblyzer.dim)
    # the same windows embed (NaN where the encoder has no vector for one, in both)
    assert (np.isnan(faulty) == np.isnan(clean)).all() and np.isfinite(clean).any()
    np.testing.assert_allclose(faulty, clean, atol=2e-5, equal_nan=True)
    # later blocks start at the size that fitted: no block fails first again
    assert embedder.batch == 4


def test_blocks_after_an_out_of_memory_cover_every_window_once(resemblyzer, speech, monkeypatch):
    plan = _plan(speech)
    monkeypatch.setenv(OOM_ABOVE, "7")
    blocks = list(WindowEmbedder(resemblyzer, batch=16).iter_embed(speech, plan))
    firsts = [first for first, _ in blocks]
    sizes = [len(vectors) for _, vectors in blocks]
    assert firsts[0] == 0 and sizes[0] == 16  # the first block, embedded in halves of 8, then 4
    assert all(size <= 4 for size in sizes[1:])  # the rest planned at 4 (half of 8)
    assert firsts == list(np.cumsum([0] + sizes[:-1])) and sum(sizes) == len(plan)


def test_cutting_embeds_an_item_as_without_the_fault(resemblyzer, speech, monkeypatch):
    """The path of `verify --deep` and queries by audio (`ReferenceEmbedder`)."""
    clean, clean_times = Cutting("none", "0.5:0.25").embed(resemblyzer, speech)
    monkeypatch.setenv(OOM_ABOVE, "3")
    vectors, times = Cutting("none", "0.5:0.25").embed(resemblyzer, speech)
    np.testing.assert_array_equal(times, clean_times)
    np.testing.assert_allclose(vectors, clean, atol=2e-5)


def test_a_window_that_does_not_fit_alone_raises(resemblyzer, speech, monkeypatch):
    monkeypatch.setenv(OOM_ABOVE, "0")
    with pytest.raises(Exception, match="out of memory") as err:
        WindowEmbedder(resemblyzer, batch=8).embed(speech, _plan(speech))
    assert is_out_of_memory(err.value)


class SmallDevice:
    """An encoder whose forward fails as a full device does above `room` windows; each
    window's vector depends on its own features only (their sum and length)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.forwards: list[int] = []

    def __call__(self, feats: Sequence[Any]) -> np.ndarray:
        if len(feats) > self.room:
            raise OutOfMemoryError("CUDA error: device-side allocation failed")
        self.forwards.append(len(feats))
        return np.array([[float(np.sum(f)), float(len(f))] for f in feats], dtype=np.float32)


def test_halving_is_exact_and_reports_each_failed_size():
    feats = [np.full(k % 5 + 1, k, dtype=np.float32) for k in range(13)]
    device = SmallDevice(room=3)
    failed: list[int] = []
    out = embed_halving(device, feats, failed.append)
    np.testing.assert_array_equal(out, SmallDevice(room=13)(feats))
    assert failed == [13, 6, 7, 4] and max(device.forwards) <= 3 and sum(device.forwards) == 13
    with pytest.raises(ValueError):  # anything but out of memory is not retried
        embed_halving(lambda units: (_ for _ in ()).throw(ValueError("bad input")), feats)


def test_out_of_memory_is_recognised_by_type_and_message():
    assert is_out_of_memory(OutOfMemoryError("anything"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[ONNXRuntimeError] : 6 : Failed to allocate: Out of memory"))
    assert not is_out_of_memory(ValueError("no speech in the window"))
