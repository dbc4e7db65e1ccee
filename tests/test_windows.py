"""Window specs and the windows inside speech regions (WeSpeaker's subsegment policy)."""

from __future__ import annotations

import numpy as np
import pytest

from embstore.errors import WindowSpecError
from embstore.segments.windows import (
    WindowSpec,
    parse_window_spec,
    windows_in_regions,
)


def test_parse_window_spec():
    assert parse_window_spec("1.5:0.75") == WindowSpec(1.5, 0.75)
    assert parse_window_spec(" 2 : 1 ") == WindowSpec(2.0, 1.0)
    assert parse_window_spec("3") == WindowSpec(3.0, 1.5)
    assert parse_window_spec("1.5:1.5") == WindowSpec(1.5, 1.5)  # adjacent, no overlap
    assert str(parse_window_spec("1.5:0.75")) == "1.5:0.75"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("1.5:0", "shift must be a positive"),
        ("1.5:2", "longer than the window"),
        ("-1.5:0.75", "window must be a positive"),
        ("1.5:-0.75", "shift must be a positive"),
        ("abc", "not a number"),
        ("1.5:x", "not a number"),
        ("1:2:3", "expected WINDOW:SHIFT"),
        ("", "expected WINDOW:SHIFT"),
        ("nan:0.5", "window must be a positive"),
        ("inf:0.5", "window must be a positive"),
    ],
)
def test_bad_specs_give_one_line(spec, words):
    with pytest.raises(WindowSpecError) as err:
        parse_window_spec(spec)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def _reference_subsegment(a: float, b: float, window: float, shift: float) -> list[tuple[float, float]]:
    """WeSpeaker's subsegment() in 10 ms frames, converted back to seconds."""
    length, w, p = round((b - a) * 100), round(window * 100), round(shift * 100)
    if length <= w:
        return [(a, b)]
    return [(round(a + s / 100, 3), round(a + min(s + w, length) / 100, 3)) for s in range(0, length - w + p, p)]


@pytest.mark.parametrize("length", [0.3, 1.5, 1.6, 2.25, 2.26, 3.0, 3.74, 3.76, 10.0, 61.37])
def test_windows_match_wespeaker_subsegments(length):
    plan = windows_in_regions([(2.0, 2.0 + length)], 1.5, 0.75)
    assert plan.spans() == _reference_subsegment(2.0, 2.0 + length, 1.5, 0.75)


def test_last_window_policy_and_short_marks():
    plan = windows_in_regions([(0.0, 3.0)], 1.5, 0.75)
    # starts 0, 0.75, 1.5 (1.5 < 3.0 - 1.5 + 0.75): the last is full here
    assert plan.spans() == [(0.0, 1.5), (0.75, 2.25), (1.5, 3.0)]
    assert not plan.short.any()
    plan = windows_in_regions([(0.0, 3.5)], 1.5, 0.75)
    assert plan.spans()[-1] == (2.25, 3.5)  # 1.25 s > window - shift: kept, short
    assert plan.short.tolist() == [False, False, False, True]
    plan = windows_in_regions([(0.0, 2.9)], 1.5, 0.75)
    assert plan.spans()[-1] == (1.5, 2.9)


def test_windows_stay_inside_speech_and_cover_it():
    regions = [(0.5, 4.0), (6.0, 6.8), (9.0, 20.0)]
    plan = windows_in_regions(regions, 1.5, 0.75, total_duration=19.0)
    for s, e in plan:
        assert any(a - 1e-9 <= s and e <= min(b, 19.0) + 1e-9 for a, b in regions)
    covered = np.zeros(2000, dtype=bool)
    for s, e in plan:
        covered[int(round(s * 100)) : int(round(e * 100))] = True
    expected = np.zeros(2000, dtype=bool)
    for a, b in regions:
        expected[int(a * 100) : int(min(b, 19.0) * 100)] = True
    assert np.array_equal(covered, expected)
    short_one = [(s, e) for (s, e), short in zip(plan, plan.short) if 6.0 <= s < 7.0]
    assert short_one == [(6.0, 6.8)]
    assert plan.ends.max() <= 19.0


def test_short_item_gets_one_short_window_and_empty_regions_none():
    plan = windows_in_regions([(0.1, 0.9)], 1.5, 0.75)
    assert plan.spans() == [(0.1, 0.9)] and plan.short.tolist() == [True]
    assert len(windows_in_regions([], 1.5, 0.75)) == 0
    assert len(windows_in_regions([(5.0, 6.0)], 1.5, 0.75, total_duration=4.0)) == 0


def test_hour_of_windows_does_not_drift():
    plan = windows_in_regions([(0.0, 3600.0)], 1.5, 0.75)
    assert len(plan) == 4799
    assert plan.starts[-1] == pytest.approx(3598.5) and plan.ends[-1] == 3600.0
    assert np.allclose(np.diff(plan.starts), 0.75)
