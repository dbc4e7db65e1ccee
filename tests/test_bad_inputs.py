"""Bad and odd inputs: each is embedded correctly or fails alone with a specific reason.

One corpus holds every case (made here, from one 48 kHz signal), one `extract` runs over
it with the default model, and each test checks one outcome. Odd-but-valid formats are
compared with the same content stored as 16 kHz mono float (`ref16.wav`, also in the
corpus): the thresholds are what the conversion honestly allows (8-bit quantisation
noise and the 4 kHz band limit of 8 kHz audio change the features a little).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import embstore
from embstore.cli import cli
from embstore.synthetic import voice

SPK = Path("ds") / "spk"
# Resemblyzer, named: its frontend's own VAD trim is what fails the 50 ms file ("no speech
# found") and its output is unit-norm; the default model (CAM++) embeds 50 ms as it is
MODEL = "resemblyzer-ge2e"
ODD_NAMES = ["with space.wav", "it's \"quoted\".wav", "ünïcödé 声音.wav"]

# file -> minimum cosine with ref16.wav
CONVERTED = {
    "p16.wav": 0.9999,
    "p24.wav": 0.9999,
    "float64.wav": 0.9999,
    "stereo.wav": 0.9999,  # equal channels: the mean is the signal
    "r22050.wav": 0.9999,
    "r44100.wav": 0.9999,
    "r48000.wav": 0.9999,
    "r8000.wav": 0.99,  # no energy above 4 kHz
    "u8.wav": 0.95,  # 8-bit quantisation noise, ~-48 dB
}
# file -> (stage, words the recorded reason must contain)
FAILS = {
    "empty.wav": ("scan", "empty file (0 bytes)"),
    "header_only.wav": ("scan", "no audio samples (header only)"),
    "random_bytes.wav": ("scan", "unreadable header"),
    "text.flac": ("scan", "unreadable header"),
    "truncated.wav": ("scan", "truncated file"),
    "dangling.wav": ("scan", "broken symlink"),
    "truncated.flac": ("decode", "flac decoder lost sync"),
    "nan.wav": ("decode", "non-finite samples"),
    "inf.wav": ("decode", "non-finite samples"),
    "zeros.wav": ("decode", "silent audio (all samples are zero)"),
    "short_50ms.wav": ("features", "no speech found"),
    "vanished.wav": ("read", "file not found"),
}


def _make_corpus(root: Path) -> None:
    import soundfile as sf
    import soxr

    d = root / SPK
    d.mkdir(parents=True)
    base48 = voice(1.6, 48000, 150, seed=7).astype(np.float64)
    ref16 = soxr.resample(base48, 48000, 16000, quality="VHQ").astype(np.float32)
    sf.write(d / "ref16.wav", ref16, 16000, subtype="FLOAT")
    sf.write(d / "p16.wav", ref16, 16000, subtype="PCM_16")
    sf.write(d / "p24.wav", ref16, 16000, subtype="PCM_24")
    sf.write(d / "u8.wav", ref16, 16000, subtype="PCM_U8")
    sf.write(d / "float64.wav", ref16, 16000, subtype="DOUBLE")
    sf.write(d / "stereo.wav", np.stack([ref16, ref16], axis=1), 16000, subtype="FLOAT")
    for rate in (8000, 22050, 44100, 48000):
        sf.write(d / f"r{rate}.wav", soxr.resample(base48, 48000, rate, quality="VHQ").astype(np.float32), rate,
                 subtype="FLOAT")
    for name in ODD_NAMES:
        sf.write(d / name, voice(1.2, 16000, 120, seed=len(name)), 16000)
    os.symlink(d / "ref16.wav", d / "link.wav")
    os.symlink(d / "no-such-target.wav", d / "dangling.wav")
    (d / "folder.wav").mkdir()  # a directory named like audio: not an item, not an error
    sf.write(d / "vanished.wav", voice(1.0, 16000, 130, seed=3), 16000)
    # failures
    (d / "empty.wav").write_bytes(b"")
    sf.write(d / "header_only.wav", np.zeros(0, dtype=np.float32), 16000)
    (d / "random_bytes.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    (d / "text.flac").write_text("this is not audio\n" * 30)
    for name in ("truncated.wav", "truncated.flac"):
        sf.write(d / name, ref16, 16000, subtype="PCM_16")
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])  # header intact, data cut
    for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        x = ref16.copy()
        x[1000:1010] = value
        sf.write(d / name, x, 16000, subtype="FLOAT")
    sf.write(d / "zeros.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(d / "short_50ms.wav", ref16[:800], 16000)
    _write_hour(d / "one_hour_8k.wav")


def _write_hour(path: Path) -> None:
    """One hour at 8 kHz in 1-minute blocks: a few seconds of voice, then near-silence."""
    import soundfile as sf

    rate = 8000
    noise = (np.random.default_rng(1).standard_normal(rate * 60) * 1e-4).astype(np.float32)
    with sf.SoundFile(str(path), "w", samplerate=rate, channels=1, subtype="PCM_16") as f:
        speech = voice(5.0, rate, 140, seed=11)
        f.write(speech)
        written = len(speech)
        while written < 3600 * rate:
            n = min(len(noise), 3600 * rate - written)
            f.write(noise[:n])
            written += n


# one worker for the module: its run is made once (tests/conftest.py reads this line)
pytestmark = pytest.mark.xdist_group("bad-inputs-run")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-inputs")
    root = base / "root"
    _make_corpus(root)
    st = embstore.open(base / "store")
    report = st.scan([root])
    (root / SPK / "vanished.wav").unlink()  # deleted between scan and extract
    summary = st.extract(model="resemblyzer", device="cpu", workers=1)
    ids, vectors = st.embeddings()
    vec = {Path(i).name: v for i, v in zip(ids, vectors)}
    errors = {Path(e.path).name: e for e in st.errors().failures}
    status = st.status()
    yield {"root": root, "store": base / "store", "st": st, "scan": report, "summary": summary, "vec": vec,
           "errors": errors, "status": status}
    st.close()


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.slow
def test_the_run_completes_and_counts_add_up(result):
    summary = result["summary"]
    assert summary.error is None and not summary.interrupted
    extract_fails = sum(1 for stage, _ in FAILS.values() if stage != "scan")
    assert summary.failed == extract_fails
    embedded = len(CONVERTED) + len(ODD_NAMES) + 3  # ref16, link, one hour
    assert summary.done == embedded, sorted(result["vec"])
    assert result["st"].manifest.query("SELECT count(*) FROM tasks WHERE status IN ('pending', 'claimed')")[0][0] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_converted_formats_match_16k_mono_float(result, name):
    vec = result["vec"]
    assert cos(vec[Path(name).stem], vec["ref16"]) >= CONVERTED[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAILS))
def test_each_bad_file_fails_with_its_reason(result, name):
    stage, words = FAILS[name]
    error = result["errors"][name]
    assert error.stage == stage, error
    assert words in error.error, error
    assert str(result["root"]) not in error.error  # reasons name the cause, the path is a column


@pytest.mark.slow
def test_odd_names_symlink_and_folder(result):
    vec = result["vec"]
    for name in ODD_NAMES:
        stem = Path(name).stem
        assert stem in vec and np.isfinite(vec[stem]).all()
    # a symlink is read through: the same audio, the same vector
    assert cos(vec["link"], vec["ref16"]) >= 0.99999
    uids = [r[0] for r in result["st"].manifest.query("SELECT uid FROM items")]
    assert not any("folder" in u for u in uids)
    assert "folder.wav" not in result["errors"]


@pytest.mark.slow
def test_one_hour_item_is_embedded(result):
    st = result["st"]
    duration = st.manifest.query("SELECT duration FROM items WHERE uid LIKE '%one_hour_8k'")[0][0]
    assert duration == pytest.approx(3600.0)
    v = result["vec"]["one_hour_8k"]
    assert np.isfinite(v).all() and np.linalg.norm(v) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_status_groups_failures_by_reason(result):
    model = result["status"].models[MODEL]
    reasons = model["failures_by_reason"]
    assert sum(reasons.values()) == model["failed"]
    # both non-finite files share one reason; no reason carries a path
    assert any(n == 2 and "non-finite" in r for r, n in reasons.items())
    assert not any(str(result["root"]) in r for r in reasons)
    scan_reasons = result["status"].scan_failures_by_reason
    assert sum(scan_reasons.values()) == sum(1 for stage, _ in FAILS.values() if stage == "scan")
    assert not any(str(result["root"]) in r for r in scan_reasons)


@pytest.mark.slow
def test_errors_and_status_commands_show_them(result):
    store = str(result["store"])
    out = CliRunner().invoke(cli, ["errors", store])
    assert out.exit_code == 0
    for name in FAILS:
        assert name in out.output
    out = CliRunner().invoke(cli, ["status", store])
    assert out.exit_code == 0 and "silent audio" in out.output


@pytest.mark.slow
def test_verify_passes(result):
    out = CliRunner().invoke(cli, ["verify", str(result["store"])])
    assert out.exit_code == 0, out.output


def test_reason_grouping_strips_paths_and_counts():
    from embstore.manifest.reports import group_reasons, reason_key

    a = "decode: PyAV: Invalid data found when processing input: '/data/a b/x.wav'"
    b = "decode: PyAV: Invalid data found when processing input: '/data/c/y.wav'"
    assert reason_key(a) == reason_key(b)
    assert reason_key("truncated file: the header declares 25600 frames, the file holds 12789") == (
        "truncated file: the header declares N frames, the file holds N"
    )
    assert group_reasons([(a, 2), (b, 3), ("x", 1)]) == {reason_key(a): 5, "x": 1}


@pytest.mark.slow
def test_a_truncated_file_repaired_on_disk_is_picked_up_by_the_next_scan(result, tmp_path):
    """A truncated file fixed on disk is picked up by the next scan (size/mtime change)."""
    src = result["root"] / SPK / "ref16.wav"
    work = tmp_path / "root" / SPK
    work.mkdir(parents=True)
    data = src.read_bytes()
    (work / "cut.wav").write_bytes(data[: len(data) // 2])
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "root"])
    assert "truncated" in st.errors().failures[0].error
    shutil.copy(src, work / "cut.wav")
    report = st.scan([tmp_path / "root"])
    assert report.changed == 1 and st.status().scan_failed == 0
    st.close()
