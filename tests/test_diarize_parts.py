"""Clustering, window merging, RTTM and DER on constructed inputs with known answers."""

from __future__ import annotations

import io

import numpy as np
import pytest

from embstore.clustering.kmeans import kmeans
from embstore.clustering.labels import first_appearance
from embstore.diarize.speakers import (
    ahc_cluster,
    cluster_windows,
    spectral_cluster,
)
from embstore.diarize.der import DerResult, corpus_der, diarization_error
from embstore.errors import ClusteringError, RttmError
from embstore.diarize.rttm import (
    Segment,
    parse_rttm,
    read_rttm,
    windows_to_segments,
    write_rttm,
)


def _speakers(k: int, per: int, dim: int = 64, spread: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Window-like embeddings of k speakers, interleaved in turns of `per` windows."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim))
    truth = np.repeat(np.tile(np.arange(k), 3), per)
    x = centers[truth] + spread * np.sqrt(dim) * rng.standard_normal((len(truth), dim)) / np.sqrt(dim)
    return x.astype(np.float32), truth


def _agree(a: np.ndarray, b: np.ndarray) -> bool:
    """Same partition up to renaming."""
    return np.array_equal(first_appearance(a), first_appearance(b))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_spectral_finds_the_speaker_count(k):
    x, truth = _speakers(k, per=12, seed=k)
    labels = spectral_cluster(x)
    assert _agree(labels, truth)


def test_spectral_num_and_max_speakers():
    x, truth = _speakers(4, per=10)
    assert len(set(spectral_cluster(x, num_speakers=2).tolist())) == 2
    assert len(set(spectral_cluster(x, max_speakers=3).tolist())) <= 3
    assert _agree(spectral_cluster(x, num_speakers=4), truth)
    with pytest.raises(ClusteringError, match="not both"):
        spectral_cluster(x, num_speakers=2, max_speakers=3)
    with pytest.raises(ClusteringError, match=">= 1"):
        cluster_windows(x, num_speakers=0)


def test_spectral_is_deterministic_and_handles_tiny_inputs():
    x, _ = _speakers(3, per=8)
    assert np.array_equal(spectral_cluster(x), spectral_cluster(x.copy()))
    assert spectral_cluster(x[:2]).tolist() == [0, 0]
    assert spectral_cluster(x[:1]).tolist() == [0]
    assert spectral_cluster(x[:0]).tolist() == []
    assert spectral_cluster(x[:2], num_speakers=2).tolist() == [0, 1]
    assert len(spectral_cluster(x[:5])) == 5


def test_ahc_threshold_and_counts():
    x, truth = _speakers(3, per=10)
    assert _agree(ahc_cluster(x, threshold=0.5), truth)
    assert ahc_cluster(x, threshold=-1.0).max() == 0  # everything is similar enough
    assert len(set(ahc_cluster(x, threshold=0.9999).tolist())) == len(x)
    assert ahc_cluster(x, threshold=0.9999, max_speakers=3).max() == 2
    assert _agree(ahc_cluster(x, num_speakers=3), truth)
    assert _agree(cluster_windows(x, method="ahc", threshold=0.5), truth)
    with pytest.raises(ClusteringError, match="unknown clustering method"):
        cluster_windows(x, method="kmeans")


def test_kmeans_and_first_appearance():
    rng = np.random.default_rng(1)
    data = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (20, 2))])
    labels = kmeans(data, 2, seed=3)
    assert first_appearance(labels).tolist() == [0] * 20 + [1] * 20
    assert first_appearance(np.array([7, 7, 2, 9, 2])).tolist() == [0, 0, 1, 2, 1]


def test_windows_to_segments_merges_and_splits_halfway():
    starts = [0.0, 0.75, 1.5, 2.25, 3.0, 10.0, 10.75]
    ends = [1.5, 2.25, 3.0, 3.75, 4.5, 11.5, 12.0]
    labels = [0, 0, 0, 1, 1, 1, 0]
    segs = windows_to_segments(starts, ends, labels)
    assert segs == [
        Segment(0.0, 2.625, "spk00"),  # overlap [2.25, 3.0] with a new label: split at 2.625
        Segment(2.625, 4.5, "spk01"),
        Segment(10.0, 11.125, "spk01"),  # a gap always starts a new segment
        Segment(11.125, 12.0, "spk00"),
    ]
    assert windows_to_segments([], [], []) == []
    assert windows_to_segments([0.2], [0.9], [3]) == [Segment(0.2, 0.9, "spk03")]


def test_rttm_round_trip(tmp_path):
    items = {
        "meeting-1": [Segment(0.0, 2.625, "spk00"), Segment(2.625, 4.5, "spk01")],
        "b": [Segment(1.0005, 3.25, "spk00")],
    }
    path = tmp_path / "out.rttm"
    write_rttm(path, items)
    lines = path.read_text().splitlines()
    assert lines[0] == "SPEAKER meeting-1 1 0.000 2.625 <NA> <NA> spk00 <NA> <NA>"
    back = read_rttm(path)
    assert list(back) == ["meeting-1", "b"]
    assert [(round(s.start, 3), round(s.end, 3), s.speaker) for s in back["meeting-1"]] == [
        (0.0, 2.625, "spk00"), (2.625, 4.5, "spk01")]
    buffer = io.StringIO()
    write_rttm(buffer, items)
    assert buffer.getvalue() == path.read_text()
    text = ";; comment\nSPKR-INFO x 1 <NA> <NA> <NA> unknown A <NA> <NA>\nSPEAKER x 1 5 1 <NA> <NA> B <NA> <NA>\n" \
           "SPEAKER x 1 1 2 <NA> <NA> A <NA> <NA>\n"
    assert parse_rttm(text) == {"x": [Segment(1.0, 3.0, "A"), Segment(5.0, 6.0, "B")]}


@pytest.mark.parametrize(
    "text, words",
    [
        ("SPEAKER x 1 0.0\n", "at least 8 fields"),
        ("SPEAKER x 1 a 1 <NA> <NA> A\n", "not numbers"),
        ("SPEAKER x 1 -1 1 <NA> <NA> A\n", "negative"),
    ],
)
def test_rttm_bad_lines(text, words):
    with pytest.raises(RttmError, match=words):
        parse_rttm(text)


def test_rttm_rejects_whitespace_ids(tmp_path):
    with pytest.raises(RttmError, match="whitespace"):
        write_rttm(tmp_path / "x.rttm", {"my item": [Segment(0, 1, "A")]})


# ---------------------------------------------------------------- DER, hand-computed

REF = [Segment(0.0, 10.0, "A"), Segment(10.0, 20.0, "B")]


def test_der_perfect_and_swapped_labels():
    assert diarization_error(REF, REF, collar=0.0).der == 0.0
    swapped = [Segment(0.0, 10.0, "x"), Segment(10.0, 20.0, "y")]
    result = diarization_error(REF, swapped, collar=0.0)
    assert result.der == 0.0 and set(result.mapping) == {("x", "A"), ("y", "B")}


def test_der_missed_segment_and_false_alarm_speaker():
    missed = diarization_error(REF, [Segment(0.0, 10.0, "A")], collar=0.0)
    assert (missed.total, missed.missed, missed.false_alarm, missed.confusion) == (20.0, 10.0, 0.0, 0.0)
    assert missed.der == 0.5
    extra = REF + [Segment(20.0, 25.0, "C")]
    fa = diarization_error(REF, extra, collar=0.0)
    assert (fa.false_alarm, fa.missed, fa.confusion) == (5.0, 0.0, 0.0)
    assert fa.der == pytest.approx(0.25)


def test_der_confusion_uses_the_optimal_mapping():
    # hyp: one label over everything; the best mapping gives it A (or B): 10 s confused
    one = diarization_error(REF, [Segment(0.0, 20.0, "h")], collar=0.0)
    assert one.confusion == 10.0 and one.der == 0.5
    # hyp splits at 12 s: mapping h1->A, h2->B; 2 s (10-12) confused
    split = diarization_error(REF, [Segment(0.0, 12.0, "h1"), Segment(12.0, 20.0, "h2")], collar=0.0)
    assert split.confusion == pytest.approx(2.0) and split.der == pytest.approx(0.1)


def test_der_collar_excludes_boundaries():
    shifted = [Segment(0.0, 10.2, "A"), Segment(10.2, 20.0, "B")]
    assert diarization_error(REF, shifted, collar=0.0).confusion == pytest.approx(0.2)
    with_collar = diarization_error(REF, shifted, collar=0.25)
    assert with_collar.der == 0.0
    # 0.25 s each side of the boundaries at 0, 10 (A's end and B's start coincide) and 20
    assert with_collar.total == pytest.approx(20.0 - 0.25 - 0.5 - 0.25)
    late = [Segment(0.0, 10.4, "A"), Segment(10.4, 20.0, "B")]
    assert diarization_error(REF, late, collar=0.25).confusion == pytest.approx(0.15)


def test_der_overlap_counts_each_speaker():
    ref = [Segment(0.0, 10.0, "A"), Segment(5.0, 10.0, "B")]
    hyp = [Segment(0.0, 10.0, "a")]
    result = diarization_error(ref, hyp, collar=0.0)
    assert (result.total, result.missed, result.confusion) == (15.0, 5.0, 0.0)


def test_corpus_der_adds_components():
    total, per = corpus_der({"x": REF, "y": REF}, {"x": REF})
    assert per["x"].der == 0.0 and per["y"].missed == per["y"].total
    assert total.der == pytest.approx(0.5, abs=0.01)
    assert DerResult(0, 0, 0, 0).der == 0.0 and DerResult(0, 0, 1, 0).der == float("inf")


def test_der_equals_pyannote_metrics_on_random_cases():
    metrics = pytest.importorskip("pyannote.metrics.diarization")
    from pyannote.core import Annotation
    from pyannote.core import Segment as PSegment

    rng = np.random.default_rng(0)

    def random_segments(n_spk: int) -> list[Segment]:
        # overlapping speech, but never a speaker overlapping itself (pyannote would
        # count such a speaker twice, md-eval and we once)
        out, t = [], 0.0
        while t < 60:
            t += rng.uniform(0, 1.5)
            d = rng.uniform(0.3, 6)
            busy = {s.speaker for s in out if s.end > t}
            free = [f"s{k}" for k in range(n_spk) if f"s{k}" not in busy]
            if free:
                out.append(Segment(round(t, 2), round(t + d, 2), free[int(rng.integers(len(free)))]))
            t += d * rng.uniform(0.5, 1.0)
        return out

    def annotation(segs: list[Segment]) -> Annotation:
        ann = Annotation()
        for k, s in enumerate(segs):
            ann[PSegment(s.start, s.end), k] = s.speaker
        return ann

    import warnings

    warnings.simplefilter("ignore", UserWarning)  # pyannote: uem approximated by the extents
    for case in range(15):
        ref, hyp = random_segments(3), random_segments(int(rng.integers(1, 5)))
        collar = [0.0, 0.25][case % 2]
        ours = diarization_error(ref, hyp, collar=collar)
        theirs = metrics.DiarizationErrorRate(collar=2 * collar)(annotation(ref), annotation(hyp), detailed=True)
        assert ours.total == pytest.approx(theirs["total"], abs=1e-6)
        assert ours.der == pytest.approx(theirs["diarization error rate"], abs=1e-6)
