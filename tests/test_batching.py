"""How loaded items are grouped into exact batches (extract/batching.py)."""

from __future__ import annotations

import numpy as np

from embstore.extract.batching import MAX_PADDING, Loaded, plan_batches
from embstore.extract.messages import ClaimedTask


def items(lengths: list[int], bins: int = 4) -> list[Loaded]:
    return [
        Loaded(ClaimedTask(k, k, f"u{k}", f"/x/{k}.wav", None, None, n / 100, n), feats=np.zeros((n, bins), np.float32))
        for k, n in enumerate(lengths)
    ]


def test_masked_batches_keep_padding_small_however_large_the_budget():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(200, 2000, size=300)]
    batches, real, padded = plan_batches(items(lengths), "masked", batch_frames=10**9)
    assert sorted(x.task.task_id for b in batches for x in b) == list(range(300))
    assert real == sum(lengths)
    for b in batches:
        sizes = [x.feats.shape[0] for x in b]
        assert sizes == sorted(sizes)
        assert len(b) * max(sizes) <= (1 + MAX_PADDING) * sum(sizes) + 1e-9
    assert padded / real - 1 <= MAX_PADDING
    assert len(batches) < 300 / 4  # still real batches, not one item each


def test_masked_batches_fit_the_frame_budget():
    batches, _, _ = plan_batches(items([100] * 50), "masked", batch_frames=1000)
    assert all(len(b) * 100 <= 1000 for b in batches) and sum(map(len, batches)) == 50


def test_equal_batches_hold_one_length_and_any_mixes():
    batches, real, padded = plan_batches(items([100, 101, 100, 300]), "equal", batch_frames=10**6)
    assert {tuple(sorted({x.feats.shape[0] for x in b})) for b in batches} == {(100,), (101,), (300,)}
    assert real == padded
    trimmed, _, _ = plan_batches(items([100, 101, 100, 300]), "equal", batch_frames=10**6, max_trim=1)
    assert sorted(len(b) for b in trimmed) == [1, 3] and {x.feats.shape[0] for x in trimmed[0]} == {100}
    mixed, _, _ = plan_batches(items([5, 7, 9]), "any", batch_frames=10**6)
    assert len(mixed) == 1
