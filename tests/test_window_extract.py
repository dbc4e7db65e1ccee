"""Window models through the extraction machinery: `extract --windows`, `--vad`,
`Store.windows`, `embstore windows`, exports and `similar --audio` of windows, verify."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

import embstore
from embstore.cli import cli
from embstore.models.registry import load
from embstore.segments.vad import speech_regions, vad_config
from embstore.segments.window_embed import WindowEmbedder
from embstore.segments.windows import windows_in_regions

WIN = "campplus-zh-en-common+w1.5:0.75+silero"  # the default model's windows
# one xdist worker for the module: its store fixture is built once
pytestmark = pytest.mark.xdist_group("window-store")


@pytest.fixture(scope="module")
def corpus(speech_corpus, tmp_path_factory):
    """4 files of one speaker (real, or synthetic speech without ../shared/data), a
    byte-identical copy of one, a 1 s cut (one short window), a 0.4 s cut (too short) and
    a near-silent file (no speech)."""
    root = tmp_path_factory.mktemp("win") / "root"
    speaker = speech_corpus.speakers()[0]
    spk = root / "ds" / speaker
    spk.mkdir(parents=True)
    files = speech_corpus.files(speaker)[:4]
    for f in files:
        shutil.copy(f, spk / f.name)
    shutil.copy(files[0], spk / "copy.flac")
    wav, rate = sf.read(files[1], dtype="float32")
    regions = speech_regions(wav, rate, vad_config("silero"))
    a = int(regions[0][0] * rate)
    sf.write(spk / "short.wav", wav[a : a + rate], rate)
    sf.write(spk / "tiny.wav", wav[a : a + int(0.4 * rate)], rate)
    rng = np.random.default_rng(0)
    sf.write(spk / "hiss.wav", (rng.standard_normal(3 * rate) * 1e-4).astype(np.float32), rate)
    return root


@pytest.fixture(scope="module")
def names(corpus) -> list[str]:
    """The stems of the corpus's 4 speech files, in order."""
    return sorted(p.stem for p in corpus.glob("ds/*/*.flac") if p.stem != "copy")


def _path(corpus, name: str):
    (path,) = corpus.glob(f"ds/*/{name}.flac")
    return path


@pytest.fixture(scope="module")
def store(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("wstore") / "s"
    st = embstore.open(path)
    st.scan([corpus])
    first = st.extract(windows="1.5:0.75", limit=3)  # a run stopped early, then resumed
    rest = st.extract(windows="1.5:0.75")
    st.extract()  # whole items of the same network, beside the windows
    st.close()
    return path, first, rest


def test_windows_equal_the_embedder_on_each_item(store, corpus, names):
    path, first, rest = store
    assert first.done + first.failed == 3 and rest.model == WIN
    st = embstore.open(path)
    encoder = load("campplus")
    for name in names[:2]:
        starts, ends, matrix = st.windows(name, model=WIN)
        wav = encoder.load(str(_path(corpus, name)))
        regions = speech_regions(wav, encoder.sample_rate, vad_config("silero"))
        plan = windows_in_regions(regions, 1.5, 0.75, len(wav) / encoder.sample_rate)
        np.testing.assert_allclose(starts, plan.starts, atol=1e-3)
        np.testing.assert_allclose(ends, plan.ends, atol=1e-3)
        expected = WindowEmbedder(encoder).embed(wav, plan)
        # the run used ONNX Runtime (auto on CPU), the reference torch: equal to float noise
        assert np.abs(matrix - expected).max() <= 1e-5 * np.abs(expected).max()
    # both models live side by side; item queries pick the whole-item one
    kinds = sorted(m.kind for m in st.models())
    assert kinds == ["item", "windows"]
    assert len(st.similar(item_id=names[0], k=2)) == 2
    st.close()


def test_bad_and_short_items_fail_with_reasons(store):
    path, _, _ = store
    st = embstore.open(path)
    errors = {e.id.rsplit("/", 1)[-1]: e for e in st.errors(model=WIN).failures}
    assert set(errors) == {"tiny", "hiss"}, errors
    assert "shorter than one window" in errors["tiny"].error
    assert errors["hiss"].stage == "vad" and "no speech" in errors["hiss"].error
    starts, ends, _ = st.windows("short", model=WIN)
    assert len(starts) == 1 and ends[0] - starts[0] < 1.5
    st.close()


def test_identical_audio_shares_its_windows(store, names):
    path, _, _ = store
    st = embstore.open(path)
    a = st.windows(names[0], model=WIN)
    b = st.windows("copy", model=WIN)
    np.testing.assert_array_equal(a[2], b[2])
    report = st.verify(model=WIN, deep=2, seed=1)
    assert report.ok, report.as_dict()
    assert report.as_dict()["models"][WIN]["deep"]["min_cosine"] > 0.9999
    st.close()


def test_cli_windows_exports_and_search(store, corpus, names, tmp_path):
    path, _, _ = store
    runner = CliRunner()
    out = runner.invoke(cli, ["windows", str(path), names[1], "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert rows and all(r["end"] > r["start"] for r in rows)
    kaldi = tmp_path / "k"
    out = runner.invoke(cli, ["export-kaldi", str(path), str(kaldi), "--model", WIN])
    # two items of the corpus have no speech to window: failed, so not in the export (exit 3)
    failed = embstore.open(path).manifest.query("SELECT count(*) FROM tasks t JOIN models m ON m.id = t.model_id"
                                       " WHERE t.status = 'failed' AND m.kind = 'windows'")[0][0]
    assert failed and out.exit_code == 3, out.output
    assert f"{failed} items failed: see `embstore errors" in out.output
    segments = (kaldi / "segments").read_text().splitlines()
    first = segments[0].split()
    assert first[0] == f"{first[1]}-{round(float(first[2]) * 1000):07d}-{round(float(first[3]) * 1000):07d}"
    npy = tmp_path / "n"
    out = runner.invoke(cli, ["export-npy", str(path), str(npy), "--model", WIN, "--json"])
    assert out.exit_code == 3, out.output
    assert json.loads(out.stdout)["outcome"]["failed"] == failed
    matrix = np.load(npy / "embeddings.npy")
    assert len(matrix) == len(segments) == len(np.load(npy / "starts.npy"))
    query = _path(corpus, names[2])
    out = runner.invoke(cli, ["similar", str(path), "--audio", str(query), "--model", WIN, "-k", "3", "--json"])
    assert out.exit_code == 0, out.output
    hits = json.loads(out.output)
    assert len(hits) == 3 and all("start" in h and h["end"] > h["start"] for h in hits)
    assert hits[0]["id"].endswith(names[2])


@pytest.mark.parametrize("spec", ["1.5:0", "1:2", "-1:0.5", "x:1"])
def test_bad_window_specs_are_one_line(spec, tmp_path):
    embstore.open(tmp_path / "s").close()
    out = CliRunner().invoke(cli, ["extract", str(tmp_path / "s"), "--windows", spec])
    assert out.exit_code != 0
    assert out.output.startswith("Error: --windows") and out.output.count("\n") == 1, out.output


def test_whole_items_of_speech_only(corpus, tmp_path):
    st = embstore.open(tmp_path / "s")
    st.scan([corpus])
    summary = st.extract(vad="webrtc")
    assert summary.model == "campplus-zh-en-common+webrtc"
    errors = {e.id.rsplit("/", 1)[-1]: e for e in st.errors().failures}
    assert "hiss" in errors and "no speech" in errors["hiss"].error
    assert st.extract(vad="webrtc").nothing_to_do
    st.close()
