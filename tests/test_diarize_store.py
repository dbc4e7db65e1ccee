"""`embstore diarize` on a store: windows extracted where missing, results stored, RTTM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

import embstore
from embstore.cli import cli
from embstore.diarize.der import corpus_der
from embstore.diarize.rttm import read_rttm
from embstore.synthetic import corpus_by_speaker, make_conversation


@pytest.fixture(scope="module")
def conversations(speech_corpus, tmp_path_factory):
    """Two 30 s conversations cut from real utterances, or from synthetic speech without
    ../shared/data (tests/audio_factory.py); the assertions below hold for both."""
    root = tmp_path_factory.mktemp("conv") / "root"
    folder = root / "talk" / "mixed"
    folder.mkdir(parents=True)
    corpus = corpus_by_speaker(speech_corpus.path)
    refs = {}
    for seed in (3, 4):
        conv = make_conversation(corpus, num_speakers=2, seed=seed, duration=30.0)
        sf.write(folder / f"{conv.item}.wav", conv.wav.astype(np.float32), conv.sample_rate)
        refs[f"talk/mixed/{conv.item}"] = conv.reference
    return root, refs


def test_diarize_extracts_windows_stores_results_and_writes_rttm(conversations, tmp_path):
    root, refs = conversations
    store = tmp_path / "s"
    st = embstore.open(store)
    st.scan([root])
    st.close()
    rttm = tmp_path / "out.rttm"
    runner = CliRunner()
    out = runner.invoke(cli, ["diarize", str(store), "--rttm", str(rttm), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["computed"] == 2 and report["extraction"]["done"] == 2
    hyp = read_rttm(rttm)
    assert set(hyp) == set(refs)
    total, _ = corpus_der(refs, hyp, collar=0.25)
    assert total.der < 0.15, total  # two 30 s conversations; the benchmark measures the corpus
    again = runner.invoke(cli, ["diarize", str(store), "--json"])
    assert again.exit_code == 0, again.output
    second = json.loads(again.output)
    assert second["computed"] == 0 and second["reused"] == 2
    assert second["segments"] == report["segments"]
    status = runner.invoke(cli, ["status", str(store)])
    assert "2 diarized" in status.output


def test_diarize_errors_are_one_line(conversations, tmp_path):
    root, _ = conversations
    store = tmp_path / "s"
    st = embstore.open(store)
    st.scan([root])
    st.close()
    out = CliRunner().invoke(cli, ["diarize", str(store), "--num-speakers", "2", "--max-speakers", "3"])
    assert out.exit_code != 0 and out.output.startswith("Error:") and out.output.count("\n") == 1, out.output
