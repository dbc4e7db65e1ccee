"""Synthetic conversations: deterministic, no overlap unless asked, reference where the speech is."""

from __future__ import annotations

import numpy as np
import pytest

from embstore.synthetic import (
    corpus_by_speaker,
    make_conversation,
    make_conversations,
)


@pytest.fixture(scope="module")
def corpus(speech_corpus):
    # the real utterances, or tests/audio_factory.py's synthetic speech in the same layout
    return corpus_by_speaker(speech_corpus.path)


def test_corpus_layout(corpus, speech_corpus):
    speakers, per_speaker = (10, 10) if speech_corpus.real else (5, 4)  # LibriSpeech's subset; the synthetic one
    assert len(corpus) == speakers and all(len(v) == per_speaker for v in corpus.values())
    assert all(p.endswith(".flac") and p.startswith(str(speech_corpus.path)) for v in corpus.values() for p in v)


def test_deterministic_by_seed(corpus):
    a = make_conversation(corpus, 3, seed=5, duration=20)
    b = make_conversation(corpus, 3, seed=5, duration=20)
    c = make_conversation(corpus, 3, seed=6, duration=20)
    assert np.array_equal(a.wav, b.wav) and a.reference == b.reference
    assert not (len(a.wav) == len(c.wav) and np.array_equal(a.wav, c.wav))


@pytest.mark.parametrize("speakers", [2, 3, 4])
def test_turns_speakers_and_silence(corpus, speakers):
    conv = make_conversation(corpus, speakers, seed=speakers, duration=25)
    ref = conv.reference
    assert conv.duration >= 25 and ref[-1].end <= conv.duration
    assert {s.speaker for s in ref} == set(conv.speakers) and len(conv.speakers) == speakers
    # sorted, never overlapping
    assert all(x.end <= y.start for x, y in zip(ref, ref[1:]))
    # where the reference has no speech, only the -60 dBFS noise floor
    rate = conv.sample_rate
    mask = np.zeros(len(conv.wav), dtype=bool)
    for s in ref:
        mask[int(s.start * rate) : int(s.end * rate)] = True
    quiet = conv.wav[~mask]
    assert 20 * np.log10(np.sqrt(np.mean(quiet.astype(np.float64) ** 2))) < -45
    loud = conv.wav[mask]
    assert 20 * np.log10(np.sqrt(np.mean(loud.astype(np.float64) ** 2))) > -35


def test_turn_lengths_and_consecutive_speakers(corpus):
    conv = make_conversation(corpus, 2, seed=11, duration=40)
    # the reference splits a turn only at pauses >= 0.5 s: rebuild turns from gaps
    turns, current = [], [conv.reference[0]]
    for seg in conv.reference[1:]:
        if seg.speaker == current[-1].speaker and seg.start - current[-1].end < 0.5 + 0.2:
            current.append(seg)
        else:
            turns.append(current)
            current = [seg]
    turns.append(current)
    lengths = [t[-1].end - t[0].start for t in turns]
    assert max(lengths) <= 5.0 + 1e-6 and np.median(lengths) > 1.5


def test_many_conversations_mix_speaker_counts(corpus):
    convs = make_conversations(corpus, 6, seed=2, durations=(10, 12))
    assert len({len(c.speakers) for c in convs}) > 1
    assert all(2 <= len(c.speakers) <= 4 for c in convs)
    assert len({c.item for c in convs}) == 6
    with pytest.raises(ValueError, match=f"num_speakers must be in 1..{len(corpus)}"):
        make_conversation(corpus, len(corpus) + 1, seed=0)


def test_overlapping_turns_when_asked_and_none_by_default(corpus):
    plain = make_conversation(corpus, 3, seed=4, duration=30)
    same = make_conversation(corpus, 3, seed=4, duration=30, overlap=0.0)
    assert np.array_equal(plain.wav, same.wav) and plain.reference == same.reference  # earlier seeds unchanged
    mixed = make_conversation(corpus, 3, seed=4, duration=30, overlap=1.0)
    ref = mixed.reference
    # every turn after the first starts before the previous speaker's last segment ends
    crossings = [(x, y) for x, y in zip(ref, ref[1:]) if y.start < x.end]
    assert crossings and all(x.speaker != y.speaker for x, y in crossings)
    assert all(x.end - y.start <= 1.0 + 1e-6 for x, y in crossings)  # at most overlap_seconds' 1.0 s
    assert max(s.end for s in ref) <= mixed.duration + 1e-6  # rounding of the segment times
    with pytest.raises(ValueError, match="overlap must be a probability"):
        make_conversation(corpus, 2, seed=0, overlap=1.5)
