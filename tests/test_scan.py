import os
import time

import pytest

import embstore
from embstore.errors import ScanError
from tests.audio_factory import make_tree, write


def items(st):
    return {r["uid"]: dict(r) for r in st.manifest.query("SELECT * FROM items WHERE removed = 0")}


def test_dataset_layout_reads_headers_and_ignores_non_audio(tmp_path):
    make_tree(tmp_path / "root", speakers=2, per_speaker=2)
    (tmp_path / "root" / "ds" / "spk0" / "README.txt").write_text("not audio")
    write(tmp_path / "root" / "ds" / "spk1" / "video7" / "00001.wav", 0.5)  # VoxCeleb-style depth
    write(tmp_path / "root" / "loose.wav", 0.5)  # no dataset/speaker: ignored
    st = embstore.open(tmp_path / "s")
    report = st.scan([tmp_path / "root"])
    assert report.added == 5 and report.ignored == 1 and report.failed == 0
    got = items(st)
    assert "ds/spk0/spk0-0" in got and "ds/spk1/video7/00001" in got
    assert got["ds/spk1/video7/00001"]["speaker"] == "spk1"
    f = st.manifest.query("SELECT * FROM files WHERE path = ?", ("ds/spk0/spk0-1.wav",))[0]
    assert f["sample_rate"] == 16000 and f["channels"] == 1 and f["frames"] == int(1.13 * 16000)
    assert f["duration"] == pytest.approx(1.13, abs=1e-3)


def test_speaker_layout_uses_root_name_as_dataset(tmp_path):
    for spk in ("id1", "id2"):
        write(tmp_path / "vox1" / spk / "vid" / "00001.wav", 0.4)
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "vox1"], layout="speaker")
    got = items(st)
    assert set(got) == {"vox1/id1/vid/00001", "vox1/id2/vid/00001"}
    assert {r["dataset"] for r in got.values()} == {"vox1"}
    with pytest.raises(ScanError, match="layout"):
        st.scan([tmp_path / "vox1"], layout="dataset")


def test_incremental_rescan_add_change_remove(tmp_path):
    files = make_tree(tmp_path / "root", speakers=2, per_speaker=2)
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "root"])
    again = st.scan([tmp_path / "root"])
    assert again.no_changes and again.unchanged == 4
    # add one, change one, remove one (and a whole speaker folder)
    write(tmp_path / "root" / "ds" / "spk0" / "new.wav", 0.7)
    write(files[1], 2.5, seed=9)
    os.utime(files[1], ns=(time.time_ns(), time.time_ns() + 10**9))
    files[0].unlink()
    report = st.scan([tmp_path / "root"])
    assert (report.added, report.changed, report.removed) == (1, 1, 1)
    got = items(st)
    assert "ds/spk0/new" in got and "ds/spk0/spk0-0" not in got
    assert got["ds/spk0/spk0-1"]["duration"] == pytest.approx(2.5, abs=1e-3)
    for f in files[2:]:
        f.unlink()
    (tmp_path / "root" / "ds" / "spk1").rmdir()
    report = st.scan([tmp_path / "root"])
    assert report.removed == 2
    assert st.status().speakers == 1


def test_changed_file_marks_done_tasks_stale(tmp_path):
    files = make_tree(tmp_path / "root", speakers=1, per_speaker=1)
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "root"])
    model = st.manifest.register_model({"name": "m", "spec": "m", "fingerprint": "f" * 24, "dim": 4, "sample_rate": 16000,
                               "batching": "equal", "frontend": {}})
    item_id = st.manifest.query("SELECT id FROM items")[0][0]
    st.manifest.conn.execute("INSERT INTO tasks (item_id, model_id, status, length, row) VALUES (?, ?, 'done', 1, 0)",
                    (item_id, model.id))
    write(files[0], 1.5, seed=3)
    os.utime(files[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    report = st.scan([tmp_path / "root"])
    assert report.changed == 1 and report.items_stale == 1
    assert st.status().models["m"]["stale"] == 1


def test_unreadable_headers_are_recorded_and_scan_goes_on(tmp_path):
    make_tree(tmp_path / "root", speakers=1, per_speaker=2)
    bad = tmp_path / "root" / "ds" / "spk0"
    (bad / "empty.wav").write_bytes(b"")
    (bad / "random.wav").write_bytes(os.urandom(2000))
    (bad / "text.flac").write_text("hello, not flac")
    (bad / "dir.wav").mkdir()
    os.symlink(bad / "nowhere.wav", bad / "broken.wav")
    st = embstore.open(tmp_path / "s")
    report = st.scan([tmp_path / "root"])
    assert report.added == 6 and report.failed == 4
    errors = {os.path.basename(e.path): e.error for e in st.errors().failures}
    assert "empty" in errors["empty.wav"]
    assert errors["broken.wav"] == "broken symlink"
    assert "dir.wav" not in errors  # a folder is walked, not read
    assert st.status().scan_failed == 4
    assert sum(st.status().scan_failures_by_reason.values()) == 4


def test_kaldi_dir_with_segments(tmp_path):
    a = write(tmp_path / "audio" / "rec1.wav", 3.0)
    b = write(tmp_path / "audio" / "rec2.flac", 2.0, pitch=200)
    d = tmp_path / "data" / "train"
    d.mkdir(parents=True)
    (d / "wav.scp").write_text(f"rec1 {a}\nrec2 {b}\n")
    (d / "segments").write_text("u1 rec1 0.0 1.5\nu2 rec1 1.5 3.0\nu3 rec2 0.25 1.75\n")
    (d / "utt2spk").write_text("u1 alice\nu2 bob\nu3 alice\n")
    st = embstore.open(tmp_path / "s")
    st.scan(kaldi=[d])
    got = items(st)
    assert set(got) == {"u1", "u2", "u3"}
    assert got["u2"]["speaker"] == "bob" and got["u3"]["start"] == 0.25
    assert got["u3"]["duration"] == pytest.approx(1.5)
    assert {r["dataset"] for r in got.values()} == {"train"}
    # a segment dropped and one added, the audio unchanged
    (d / "segments").write_text("u1 rec1 0.0 1.5\nu3 rec2 0.25 1.75\nu4 rec2 1.0 2.0\n")
    (d / "utt2spk").write_text("u1 alice\nu3 alice\nu4 carol\n")
    report = st.scan(kaldi=[d])
    assert report.items_removed == 1 and report.items_added == 1
    assert set(items(st)) == {"u1", "u3", "u4"}


def test_kaldi_without_segments_and_piped_commands(tmp_path):
    a = write(tmp_path / "a.wav", 0.5)
    d = tmp_path / "kd"
    d.mkdir()
    (d / "wav.scp").write_text(f"utt-a {a}\n")
    (d / "utt2spk").write_text("utt-a spk\n")
    st = embstore.open(tmp_path / "s")
    st.scan(kaldi=[d])
    assert items(st)["utt-a"]["speaker"] == "spk"
    (d / "wav.scp").write_text("utt-b sox x.wav -t wav - |\n")
    with pytest.raises(ScanError, match="piped commands are not supported"):
        st.scan(kaldi=[d])


def test_list_file_with_speakers(tmp_path):
    write(tmp_path / "corpus" / "x" / "a.wav", 0.5)
    b = write(tmp_path / "corpus" / "y" / "b.wav", 0.5)
    lst = tmp_path / "corpus" / "mylist.txt"
    lst.write_text(f"x/a.wav\tjane\n{b}\n")
    st = embstore.open(tmp_path / "s")
    st.scan(lists=[lst])
    got = items(st)
    assert got["mylist/x/a"]["speaker"] == "jane"
    assert got["mylist/y/b"]["speaker"] == "y"


def test_same_stem_two_extensions_get_distinct_ids(tmp_path):
    write(tmp_path / "r" / "ds" / "s" / "a.wav", 0.3)
    write(tmp_path / "r" / "ds" / "s" / "a.flac", 0.3)
    st = embstore.open(tmp_path / "s")
    st.scan([tmp_path / "r"])
    assert set(items(st)) == {"ds/s/a", "ds/s/a.wav"} or set(items(st)) == {"ds/s/a", "ds/s/a.flac"}


def test_real_speech_tree(shared_data, tmp_path):
    st = embstore.open(tmp_path / "s")
    report = st.scan([shared_data.parent])
    assert report.added == 100
    status = st.status()
    assert status.speakers == 10 and status.items == 100
    assert 700 < status.audio_seconds < 800
    assert "librispeech-test-other/1688/1688-142285-0000" in items(st)


@pytest.mark.parametrize("subtype,ext,channels", [
    ("PCM_U8", "wav", 1), ("PCM_16", "wav", 2), ("PCM_24", "wav", 1), ("PCM_32", "wav", 2), ("FLOAT", "wav", 1),
    ("DOUBLE", "wav", 2), ("PCM_16", "flac", 2), ("PCM_24", "flac", 1), ("PCM_S8", "flac", 1),
])
def test_fast_header_parse_equals_libsndfile(tmp_path, subtype, ext, channels):
    import numpy as np
    import soundfile as sf

    from embstore.audio.io import _probe_fast, probe

    path = tmp_path / f"x.{ext}"
    sf.write(str(path), np.random.default_rng(0).uniform(-0.5, 0.5, (3001, channels)), 22050, subtype=subtype)
    info = sf.info(str(path))
    fast = _probe_fast(str(path))
    assert fast is not None
    assert (fast.sample_rate, fast.channels, fast.frames, fast.subtype) == (
        info.samplerate, info.channels, info.frames, info.subtype)
    # a cut data chunk (a broken copy) is a scan failure: libsndfile would quietly count
    # only what is there, and half an utterance would be embedded as if whole
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    if ext == "wav":
        from embstore.errors import AudioError

        with pytest.raises(AudioError, match="truncated file"):
            probe(str(path))


def test_m4a_goes_through_pyav_with_its_duration(tmp_path):
    av = pytest.importorskip("av")
    import numpy as np

    from embstore.audio.io import probe, read_audio

    path = tmp_path / "x.m4a"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        t = np.arange(32000) / 16000
        frame = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None],
                                           format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            container.mux(packet)
    info = probe(str(path))
    assert info.subtype == "av" and info.sample_rate == 16000
    assert abs(info.duration - 2.0) < 0.2  # encoder priming may add a few ms
    wav, rate = read_audio(str(path))
    assert rate == 16000 and abs(len(wav) / rate - 2.0) < 0.2
