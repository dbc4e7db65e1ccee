"""export-pkl / export-kaldi / export-npy on stores with known (synthetic) embeddings."""

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner

import embstore
from embstore.cli import cli
from embstore.export.files import safe_component
from embstore.export.pkl import pkl_paths
from tests.audio_factory import write
from tests.store_factory import fill_embeddings, kaldi_dir, make_store


def files_under(folder: Path) -> set[str]:
    return {
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".embstore-export")
    }


def stored(st, model=None) -> dict[str, np.ndarray]:
    ids, vectors = st.embeddings(model=model)
    return dict(zip(ids, vectors))


def test_flat_layout_dict_contents_and_array_format(tmp_path):
    st = make_store(tmp_path, speakers=2, per_speaker=3)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export-pkl", str(st.path), str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["written"] == report["items"] == 6 and report["unchanged"] == 0
    assert files_under(out) == {f"ds/spk{s}/utt{n}.pkl" for s in range(2) for n in range(3)}
    vectors = stored(st)
    with open(out / "ds/spk1/utt2.pkl", "rb") as f:
        raw = f.read()
    # readable by NumPy 1.x too: no reference to NumPy 2's private module
    assert b"numpy._core" not in raw
    obj = pickle.loads(raw)
    model = st.models()[0]
    assert obj["id"] == "ds/spk1/utt2" and obj["speaker"] == "spk1" and obj["dataset"] == "ds"
    assert obj["path"] == str(tmp_path / "audio/ds/spk1/utt2.wav")
    assert obj["model"] == "fake" and obj["fingerprint"] == model.fingerprint
    assert obj["start"] is None and obj["end"] is None
    emb = obj["embedding"]
    assert emb.dtype == np.float32 and emb.shape == (16,) and emb.flags.writeable
    assert np.array_equal(emb, vectors["ds/spk1/utt2"])

    arrays = tmp_path / "arrays"
    report = st.export_pkl(arrays, fmt="array", speaker="spk0")
    assert report.written == 3 and files_under(arrays) == {f"ds/spk0/utt{n}.pkl" for n in range(3)}
    with open(arrays / "ds/spk0/utt1.pkl", "rb") as f:
        bare = pickle.load(f)
    assert isinstance(bare, np.ndarray) and np.array_equal(bare, vectors["ds/spk0/utt1"])


def test_voxceleb_stems_collide_so_their_folders_are_kept(tmp_path):
    # spk<s>/vid0/00000.wav and spk<s>/vid1/00000.wav: the seed's script wrote both to 00000.pkl
    st = make_store(tmp_path, speakers=2, per_speaker=5, videos=2)
    # a file whose stem is unique within its speaker stays flat, even next to colliding ones
    write(tmp_path / "audio/ds/spk0/vid9/unique.wav", 0.2, seed=77)
    st.scan([tmp_path / "audio"])
    fill_embeddings(st)
    out = tmp_path / "out"
    report = st.export_pkl(out)
    assert report.written == report.items == 11
    # 00000 and 00001 exist in both videos; 00002 only in vid0, so it stays flat
    expected = {f"ds/spk{s}/vid{v}/{n:05d}.pkl" for s in range(2) for v in range(2) for n in range(2)}
    expected |= {"ds/spk0/00002.pkl", "ds/spk1/00002.pkl", "ds/spk0/unique.pkl"}
    assert files_under(out) == expected
    vectors = stored(st)
    for rel in expected:
        with open(out / rel, "rb") as f:
            obj = pickle.load(f)
        assert np.array_equal(obj["embedding"], vectors[obj["id"]])
        assert rel.endswith(obj["id"].split("/")[-1] + ".pkl")


def test_incremental_new_moved_removed_and_force(tmp_path):
    # one video per speaker: ds/spk<s>/vid0/00000.wav, 00001.wav; stems unique, so flat
    st = make_store(tmp_path, speakers=2, per_speaker=2, videos=1)
    out = tmp_path / "out"
    assert st.export_pkl(out).written == 4
    assert files_under(out) == {f"ds/spk{s}/{n:05d}.pkl" for s in range(2) for n in range(2)}
    again = st.export_pkl(out)
    assert again.written == 0 and again.unchanged == 4
    stamp = os.stat(out / "ds/spk1/00000.pkl").st_mtime_ns

    # a second video of spk0 repeats stem 00000: both of them move below the speaker folder;
    # a file at the speaker's root keeps its flat name, which is also its path there
    write(tmp_path / "audio/ds/spk0/vid1/00000.wav", 0.2, seed=55)
    write(tmp_path / "audio/ds/spk1/extra.wav", 0.2, seed=56)
    st.scan([tmp_path / "audio"])
    fill_embeddings(st)
    report = st.export_pkl(out)
    assert (report.written, report.moved, report.unchanged, report.removed) == (3, 1, 3, 0)
    assert files_under(out) == {
        "ds/spk0/vid0/00000.pkl", "ds/spk0/vid1/00000.pkl", "ds/spk0/00001.pkl",
        "ds/spk1/00000.pkl", "ds/spk1/00001.pkl", "ds/spk1/extra.pkl",
    }
    for rel in ("ds/spk0/vid0/00000.pkl", "ds/spk0/vid1/00000.pkl"):
        with open(out / rel, "rb") as f:
            assert pickle.load(f)["id"] == rel[: -len(".pkl")]

    # a removed audio file takes its pickle with it; untouched files are not rewritten
    (tmp_path / "audio/ds/spk1/extra.wav").unlink()
    st.scan([tmp_path / "audio"])
    report = st.export_pkl(out)
    assert (report.written, report.removed) == (0, 1)
    assert not (out / "ds/spk1/extra.pkl").exists()
    assert os.stat(out / "ds/spk1/00000.pkl").st_mtime_ns == stamp
    # exporting one speaker never prunes another's files
    assert st.export_pkl(out, speaker="spk1").unchanged == 2 and len(files_under(out)) == 5

    forced = st.export_pkl(out, force=True)
    assert forced.written == forced.items == 5


def test_changed_audio_rewrites_only_that_item(tmp_path):
    st = make_store(tmp_path, speakers=1, per_speaker=3)
    out = tmp_path / "out"
    st.export_pkl(out)
    write(tmp_path / "audio/ds/spk0/utt1.wav", 0.3, seed=999)  # new content, same name
    st.scan([tmp_path / "audio"])
    fill_embeddings(st, vector_of=lambda uid, spk: np.full(16, 7.0, np.float32))
    report = st.export_pkl(out)
    assert (report.written, report.unchanged) == (1, 2)
    with open(out / "ds/spk0/utt1.pkl", "rb") as f:
        assert np.all(pickle.load(f)["embedding"] == 7.0)


HOSTILE_SPEAKERS = ["..", "../../escape", "/etc", ".", "a\\b", "nul\x00byte", "x" * 400]
HOSTILE_UTTS = ["../../../../pwned", "/abs/olute", "..", "ok-1", "ok-2", "ok-3", "." * 3]


def test_hostile_ids_and_speakers_never_leave_out(tmp_path):
    utts = dict(zip(HOSTILE_UTTS, HOSTILE_SPEAKERS))
    st = embstore.open(tmp_path / "store")
    st.scan(kaldi=[kaldi_dir(tmp_path, utts, recording_seconds=3.0)])
    # names a scanner might never produce, written straight into the manifest
    with st.manifest.write() as conn:
        conn.execute("UPDATE items SET dataset = '../..' WHERE uid = 'ok-1'")
        conn.execute("UPDATE items SET speaker = '' WHERE uid = 'ok-2'")
        conn.execute("UPDATE items SET dataset = '/', speaker = '/' WHERE uid = 'ok-3'")
    fill_embeddings(st)
    (tmp_path / "nest").mkdir()
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "nest" / "out"
    report = st.export_pkl(out)
    assert report.written == report.items == len(utts)
    created = {p for p in tmp_path.rglob("*")} - before
    out_real = os.path.realpath(out)
    for p in created:
        assert os.path.realpath(p) == out_real or os.path.realpath(p).startswith(out_real + os.sep), p
    written = files_under(out)
    assert len(written) == len(utts)
    ids = set()
    for rel in written:
        assert all(part not in ("", ".", "..") and len(part.encode()) <= 255 for part in rel.split("/"))
        assert "\x00" not in rel
        with open(out / rel, "rb") as f:
            ids.add(pickle.load(f)["id"])
    assert ids == set(utts)


def test_a_symlink_leading_outside_out_is_refused(tmp_path):
    st = make_store(tmp_path, speakers=1, per_speaker=2)
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    (out).mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "ds")
    result = CliRunner().invoke(cli, ["export-pkl", str(st.path), str(out)])
    assert result.exit_code == 1 and "outside" in result.output and "Traceback" not in result.output
    assert list(elsewhere.iterdir()) == []


def test_path_rules_directly():
    assert safe_component("..") == "_.." and safe_component(".") == "_." and safe_component("") == "_"
    assert safe_component("a/b\\c\x00d\ne") == "a_b_c_d_e"
    long = safe_component("é" * 300)
    assert len(long.encode()) <= 200 and long != safe_component("é" * 301)

    def item(uid, speaker, path, kind="tree", dataset="ds"):
        return {"uid": uid, "speaker": speaker, "dataset": dataset, "path": path, "root_kind": kind}

    paths = pkl_paths([
        item("ds/s/a", "s", "ds/s/a.wav"),
        item("ds/s/a.flac", "s", "ds/s/a.flac"),   # same stem, same folder: ids differ by extension
        item("ds/S/x", "S", "ds/S/x.wav"),
        item("ds/s/x", "s", "ds/s/x.wav"),
        item("u1", "a/b", "/rec.wav", kind="kaldi"),
        item("u1x", "a_b", "/rec.wav", kind="kaldi"),
        item("seg/1", "a_b", "/rec.wav", kind="kaldi"),
    ])
    assert paths["ds/s/a"] == "ds/s/a.pkl" and paths["ds/s/a.flac"] == "ds/s/a.flac.pkl"
    # speakers S and s would share a folder on a case-insensitive filesystem
    assert paths["ds/S/x"].startswith("ds/S/x~") and paths["ds/s/x"].startswith("ds/s/x~")
    assert paths["u1"] == "ds/a_b/u1.pkl" and paths["seg/1"] == "ds/a_b/seg_1.pkl"
    assert len({p.casefold() for p in paths.values()}) == len(paths)
    # speakers sanitised onto one folder with names equal but for case: each gets a hash
    clash = pkl_paths([item("k1", "a/b", "/r.wav", "kaldi"), item("K1", "a_b", "/r.wav", "kaldi")])
    assert len({p.casefold() for p in clash.values()}) == 2
    assert all(p.startswith("ds/a_b/") and "~" in p for p in clash.values())
    # a path another item already holds in OUT (a/b exported earlier) is not reused
    taken = pkl_paths([item("K1", "a_b", "/r.wav", "kaldi")], taken={"ds/a_b/k1.pkl": "k1"})
    assert taken["K1"] != "ds/a_b/K1.pkl" and "~" in taken["K1"]


def test_another_models_export_folder_is_refused(tmp_path):
    st = make_store(tmp_path, speakers=1, per_speaker=2)
    fill_embeddings(st, name="other")
    out = tmp_path / "out"
    st.export_pkl(out, model="fake")
    result = CliRunner().invoke(cli, ["export-pkl", str(st.path), str(out), "--model", "other"])
    assert result.exit_code == 1 and "holds an export of model fake" in result.output
    result = CliRunner().invoke(cli, ["export-pkl", str(st.path), str(tmp_path / "o2")])
    assert result.exit_code == 1 and "several models" in result.output


def test_export_kaldi_reads_back_with_kaldiio(tmp_path):
    import kaldiio

    st = make_store(tmp_path, speakers=3, per_speaker=2, copies=1)
    out = tmp_path / "kaldi"
    result = CliRunner().invoke(cli, ["export-kaldi", str(st.path), str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["items"] == 7
    vectors = stored(st)
    here = os.getcwd()
    os.chdir(tmp_path)  # the scp's ark path must not depend on where it is read from
    try:
        table = dict(kaldiio.load_scp(str(out / "xvector.scp")))
        with kaldiio.ReadHelper(f"scp:{out / 'xvector.scp'}") as reader:
            streamed = dict(reader)
    finally:
        os.chdir(here)
    assert set(table) == set(vectors) == set(streamed)
    for key, vec in vectors.items():
        assert table[key].dtype == np.float32 and np.array_equal(table[key], vec)
        assert np.array_equal(streamed[key], vec)
    utt2spk = dict(line.split() for line in (out / "utt2spk").read_text().splitlines())
    assert utt2spk["ds/spk2/utt1"] == "spk2" and list(utt2spk) == sorted(utt2spk)
    spk2utt = {line.split()[0]: line.split()[1:] for line in (out / "spk2utt").read_text().splitlines()}
    assert spk2utt["dup"] == ["ds/dup/copy0"]
    assert sorted(u for us in spk2utt.values() for u in us) == sorted(utt2spk)
    assert not list(out.glob("*.tmp"))


def test_export_npy_rows_in_order(tmp_path):
    st = make_store(tmp_path, speakers=2, per_speaker=3, datasets=("a", "b"))
    out = tmp_path / "npy"
    result = CliRunner().invoke(cli, ["export-npy", str(st.path), str(out)])
    assert result.exit_code == 0, result.output
    matrix = np.load(out / "embeddings.npy")
    ids = (out / "ids.txt").read_text().splitlines()
    speakers = (out / "speakers.txt").read_text().splitlines()
    datasets = (out / "datasets.txt").read_text().splitlines()
    expected_ids, expected = st.embeddings()
    assert matrix.dtype == np.float32 and np.array_equal(matrix, expected) and ids == expected_ids
    assert speakers == [i.split("/")[1] for i in ids] and datasets == [i.split("/")[0] for i in ids]
    info = json.loads((out / "export.json").read_text())
    assert info["items"] == 12 and info["dim"] == 16 and info["model"] == "fake"


def test_export_needs_a_model_and_a_folder(tmp_path):
    runner = CliRunner()
    st = embstore.open(tmp_path / "store")
    st.close()
    result = runner.invoke(cli, ["export-pkl", str(tmp_path / "store"), str(tmp_path / "o")])
    assert result.exit_code == 1 and "no embeddings yet" in result.output
    st = make_store(tmp_path / "x", speakers=1, per_speaker=1)
    (tmp_path / "afile").write_text("")
    result = runner.invoke(cli, ["export-pkl", str(st.path), str(tmp_path / "afile")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    shutil.rmtree(tmp_path / "x")


def test_an_output_folder_that_cannot_be_made_is_one_line_for_every_sink(tmp_path):
    st = make_store(tmp_path, speakers=2, per_speaker=2)
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "out"  # under a file: no folder can be made there
    for command in ("export-pkl", "export-kaldi", "export-npy", "export-lhotse", "export-parquet"):
        result = CliRunner().invoke(cli, [command, str(st.path), str(out)])
        assert result.exit_code == 1, (command, result.output)
        assert result.output.strip() == f"Error: cannot create {out}: Not a directory", (command, result.output)
