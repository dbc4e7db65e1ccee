"""`scan --lhotse` and `export-lhotse`: manifests made with Lhotse's own API from the shared
files, items per supervision, cuts back with `cut.load_embedding()` equal to the store;
channels, refused sources and rescans of a changed manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

import embstore
from embstore.audio.io import content_hash, probe, read_audio
from embstore.cli import cli
from tests.store_factory import fill_embeddings, make_store

lhotse = pytest.importorskip("lhotse")
from lhotse import AudioSource, CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet  # noqa: E402


def shortest(shared_data: Path, n: int) -> list[Path]:
    return sorted(shared_data.rglob("*.flac"), key=lambda p: p.stat().st_size)[:n]


def halves(files: list[Path]) -> tuple[RecordingSet, SupervisionSet]:
    """Each file a recording, cut into two supervisions of its reader."""
    recordings, sups = [], []
    for f in files:
        rec = Recording.from_file(f)
        half = round(rec.duration / 2, 3)
        recordings.append(rec)
        sups += [SupervisionSegment(f"{rec.id}-a", rec.id, 0.0, half, speaker=f.parent.name, text="first half"),
                 SupervisionSegment(f"{rec.id}-b", rec.id, half, round(rec.duration - half, 3), speaker=f.parent.name)]
    return RecordingSet.from_recordings(recordings), SupervisionSet.from_segments(sups)


def items_of(st) -> dict[str, tuple]:
    return {r[0]: tuple(r[1:]) for r in st.manifest.query(
        "SELECT i.uid, i.speaker, i.dataset, i.start, i.end FROM items i WHERE i.removed = 0")}


@pytest.mark.slow
def test_cuts_scanned_extracted_and_exported_load_the_stores_vectors(tmp_path, shared_data, campplus_weights):
    """The issue's acceptance: two supervisions per recording, CAM++, every
    `cut.load_embedding()` equal to the store's vector; ids, speakers, text survive."""
    files = shortest(shared_data, 3)
    recordings, sups = halves(files)
    manifest = tmp_path / "libri_cuts_test.jsonl.gz"
    CutSet.from_manifests(recordings=recordings, supervisions=sups).to_file(manifest)
    runner = CliRunner()
    store = tmp_path / "s"
    result = runner.invoke(cli, ["scan", str(store), "--lhotse", str(manifest), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["added"], report["items_added"], report["failed"]) == (3, 6, 0)
    st = embstore.open(store)
    assert {u: v[:2] for u, v in items_of(st).items()} == {s.id: (s.speaker, "libri_test") for s in sups}
    assert st.extract(progress=False, workers=1).outcome.exit_status == 0
    ids, vectors = st.embeddings()
    by_id = dict(zip(ids, vectors))
    st.close()
    result = runner.invoke(cli, ["export-lhotse", str(store), str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["items"] == 6
    cuts = CutSet.from_file(tmp_path / "out" / "cuts.jsonl.gz")
    seen = set()
    for cut in cuts:
        sup = sups[cut.id]
        assert np.array_equal(cut.load_embedding(), by_id[cut.id]) and cut.load_embedding().dtype == np.float32
        assert cut.supervisions[0].speaker == sup.speaker and cut.supervisions[0].text == sup.text
        assert cut.recording.id == sup.recording_id and cut.start == pytest.approx(sup.start, abs=1e-6)
        assert cut.duration == pytest.approx(sup.duration, abs=1e-6)
        seen.add(cut.id)
    assert seen == set(by_id)
    # the text summary names the HDF5 file the cuts point at
    text = runner.invoke(cli, ["export-lhotse", str(store), str(tmp_path / "out")])
    (h5,) = (tmp_path / "out").glob("embeddings-*.h5")
    assert text.exit_code == 0 and f"embeddings in {tmp_path / 'out' / h5.name}," in text.output, text.output


def test_recordings_with_supervisions_beside_them_and_cut_offsets(tmp_path, shared_data):
    files = shortest(shared_data, 2)
    recordings, sups = halves(files)
    recordings.to_file(tmp_path / "libri_recordings_dev.jsonl.gz")
    sups.to_file(tmp_path / "libri_supervisions_dev.jsonl.gz")
    st = embstore.open(tmp_path / "s")
    report = st.scan(lhotse=[tmp_path / "libri_recordings_dev.jsonl.gz"])
    assert (report.added, report.items_added, report.failed) == (2, 4, 0)
    want = {s.id: (s.speaker, "libri_dev", None if s.start == 0 else s.start, round(s.end, 6)) for s in sups}
    # a supervision ending at its recording's end reads to the file's end
    want = {k: v[:3] + ((None,) if k.endswith("-b") else v[3:]) for k, v in want.items()}
    assert items_of(st) == want
    # a cut that starts inside its recording: the supervision's times are the cut's
    rec = recordings[files[0].stem]
    cut = CutSet.from_manifests(recordings=RecordingSet.from_recordings([rec])).to_eager()[0].truncate(
        offset=0.5, duration=1.0)
    cut = cut.with_id("late")
    cut.supervisions = [SupervisionSegment("late-sup", rec.id, 0.25, 0.5, speaker="x")]
    CutSet.from_cuts([cut]).to_file(tmp_path / "late_cuts.jsonl.gz")
    st.scan(lhotse=[tmp_path / "late_cuts.jsonl.gz"], dataset="late")
    assert items_of(st)["late-sup"] == ("x", "late", 0.75, 1.25)
    st.close()


def test_a_changed_manifest_rescans_items_in_and_out(tmp_path, shared_data):
    files = shortest(shared_data, 2)
    recordings, sups = halves(files)
    manifest = tmp_path / "c_cuts.jsonl.gz"
    CutSet.from_manifests(recordings=recordings, supervisions=sups).to_file(manifest)
    st = embstore.open(tmp_path / "s")
    st.scan(lhotse=[manifest])
    fill_embeddings(st)  # done tasks, through the real claim and writer path
    assert st.scan(lhotse=[manifest]).no_changes
    first, second = files[0].stem, files[1].stem
    changed = [s for s in sups if s.id != f"{first}-b"]  # one supervision gone
    changed = [s.with_offset(0.1) if s.id == f"{second}-a" else s for s in changed]  # one moved
    changed.append(SupervisionSegment(f"{first}-c", first, 0.2, 0.8, speaker="new"))  # one new
    CutSet.from_manifests(recordings=recordings, supervisions=SupervisionSet.from_segments(changed)).to_file(manifest)
    report = st.scan(lhotse=[manifest])
    assert (report.items_removed, report.items_stale, report.items_added) == (1, 1, 1)
    assert report.unchanged == 2 and report.changed == 0
    assert set(items_of(st)) == {s.id for s in changed}
    assert items_of(st)[f"{second}-a"][2] == pytest.approx(0.1)
    st.close()


def test_missing_files_and_unreadable_sources_fail_alone_with_their_reasons(tmp_path, shared_data):
    good, gone = shortest(shared_data, 2)
    copy = tmp_path / "copy.flac"
    copy.write_bytes(gone.read_bytes())
    recordings = [Recording.from_file(good), Recording.from_file(copy, recording_id="gone")]
    copy.unlink()
    info = sf.info(str(good))
    for rec_id, kind, source in (("web", "url", "https://example.org/a.flac"), ("piped", "command", "sox a.flac -t wav -")):
        recordings.append(Recording(id=rec_id, sources=[AudioSource(kind, [0], source)], sampling_rate=16000,
                                    num_samples=info.frames, duration=info.frames / 16000))
    RecordingSet.from_recordings(recordings).to_file(tmp_path / "bad_recordings.jsonl.gz")
    st = embstore.open(tmp_path / "s")
    report = st.scan(lhotse=[tmp_path / "bad_recordings.jsonl.gz"])
    assert set(items_of(st)) == {good.stem} and report.failed == 3
    reasons = {f["path"]: f["error"] for f in report.failures}
    assert reasons[str(copy)].startswith("file not found") and "gone" in reasons[str(copy)]
    assert reasons["web: https://example.org/a.flac"] == (
        "web: audio source is a url (https://example.org/a.flac); embstore reads files only")
    assert "audio source is a command" in reasons["piped: sox a.flac -t wav -"]
    errors = st.manifest.query("SELECT count(*) FROM files WHERE status = 'scan_failed'")[0][0]
    assert errors == 3
    st.close()


def test_one_channel_of_a_multichannel_recording(tmp_path, shared_data):
    a, b = shortest(shared_data, 2)
    left, rate = sf.read(str(a), dtype="int16", frames=32000)
    right, _ = sf.read(str(b), dtype="int16", frames=32000)
    stereo = tmp_path / "stereo.wav"
    sf.write(str(stereo), np.stack([left, right], axis=1), rate, subtype="PCM_16")
    rec = Recording.from_file(stereo)
    sups = [SupervisionSegment("left", rec.id, 0.0, 2.0, channel=0, speaker=a.parent.name),
            SupervisionSegment("right", rec.id, 0.0, 2.0, channel=1, speaker=b.parent.name),
            SupervisionSegment("both", rec.id, 0.0, 2.0, channel=[0, 1], speaker="mix")]
    CutSet.from_manifests(recordings=RecordingSet.from_recordings([rec]),
                          supervisions=SupervisionSet.from_segments(sups)).to_file(tmp_path / "st_cuts.jsonl.gz")
    st = embstore.open(tmp_path / "s")
    assert st.scan(lhotse=[tmp_path / "st_cuts.jsonl.gz"]).items_added == 3
    paths = dict(st.manifest.query("SELECT i.uid, f.path FROM items i JOIN files f ON f.id = i.file_id"))
    assert paths == {"left": f"{stereo}#channel=0", "right": f"{stereo}#channel=1", "both": str(stereo)}
    for uid, samples in (("left", left), ("right", right)):
        wav, _ = read_audio(paths[uid])
        assert np.allclose(wav, samples / 32768.0) and probe(paths[uid]).channels == 1
    # dedup never joins two channels of one file
    assert len({content_hash(p) for p in paths.values()}) == 3
    st.close()


def test_export_lhotse_of_plain_files_builds_their_recordings(tmp_path):
    st = make_store(tmp_path, speakers=2, per_speaker=2)
    report = st.export_lhotse(tmp_path / "out")
    assert report.items == 4 and report.files[0] == "cuts.jsonl.gz"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(report.files)
    ids, vectors = st.embeddings()
    by_id = dict(zip(ids, vectors))
    cuts = list(CutSet.from_file(tmp_path / "out" / "cuts.jsonl.gz"))
    assert {c.id for c in cuts} == set(by_id)
    for cut in cuts:
        assert np.array_equal(cut.load_embedding(), by_id[cut.id])
        assert cut.supervisions[0].speaker == cut.id.split("/")[1]
        assert Path(cut.recording.sources[0].source).is_file()
        # the cut's audio is the item's file, readable by Lhotse itself
        assert cut.load_audio().shape[1] == cut.recording.num_samples
    st.close()


def test_a_failed_export_lhotse_leaves_the_previous_one_readable_and_nothing_behind(tmp_path, monkeypatch):
    from embstore.interop import lhotse as interop

    st = make_store(tmp_path, speakers=2, per_speaker=2)
    out = tmp_path / "out"
    first = st.export_lhotse(out)

    def exported() -> dict[str, np.ndarray]:
        return {c.id: c.load_embedding() for c in CutSet.from_file(out / "cuts.jsonl.gz")}

    before = exported()
    # an item gone from the store: a new export's arrays lack its key
    with st.manifest.write() as conn:
        conn.execute("UPDATE items SET removed = 1 WHERE id = 1")
    real_replace = os.replace

    def fail_at_the_swap(src, dst, *args, **kwargs):
        if os.path.basename(dst) == "cuts.jsonl.gz":
            raise RuntimeError("injected between the steps")
        return real_replace(src, dst, *args, **kwargs)

    def fail_mid_write(self, uid, vector):
        raise KeyboardInterrupt  # not an OSError: the temporary files must go all the same

    for attr, target, fault, error in ((os, "replace", fail_at_the_swap, RuntimeError),
                                       (interop.EmbeddingArrays, "store", fail_mid_write, KeyboardInterrupt)):
        with monkeypatch.context() as m:
            m.setattr(attr, target, fault)
            with pytest.raises(error):
                st.export_lhotse(out)
        assert sorted(p.name for p in out.iterdir()) == sorted(first.files)
        got = exported()
        assert got.keys() == before.keys() and all(np.array_equal(got[k], before[k]) for k in got)
    second = st.export_lhotse(out)
    # the new cuts name their own file; the earlier export's file is deleted
    assert sorted(p.name for p in out.iterdir()) == sorted(second.files) and first.files[1] not in second.files
    assert exported().keys() == before.keys() - {st.manifest.query("SELECT uid FROM items WHERE id = 1")[0][0]}
    st.close()


def test_exports_into_one_folder_at_once_take_turns_and_sweep_killed_leftovers(tmp_path, monkeypatch):
    import threading

    from embstore.interop import lhotse as interop

    st = make_store(tmp_path, speakers=2, per_speaker=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".cuts-0123abcd.jsonl.gz").write_bytes(b"left by an export killed mid-way")
    inside, release = threading.Event(), threading.Event()
    real_store = interop.EmbeddingArrays.store

    def slow_store(self, uid, vector):  # the first export holds its HDF5 file open a while
        if not inside.is_set():
            inside.set()
            release.wait(30)
        return real_store(self, uid, vector)

    monkeypatch.setattr(interop.EmbeddingArrays, "store", slow_store)
    reports: list = []
    first = threading.Thread(target=lambda: reports.append(embstore.open(st.path).export_lhotse(out)))
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=lambda: reports.append(embstore.open(st.path).export_lhotse(out)))
    second.start()
    second.join(1.0)
    assert second.is_alive()  # waiting for the first one's turn, not writing beside it
    release.set()
    first.join(60)
    second.join(60)
    assert len(reports) == 2
    # the last export's cuts name a file that is there; the other's file and the leftover went
    assert sorted(p.name for p in out.iterdir()) == sorted(reports[-1].files)
    cuts = list(CutSet.from_file(out / "cuts.jsonl.gz"))
    assert cuts and all(c.load_embedding().shape == (st.models()[0].dim,) for c in cuts)
    st.close()
