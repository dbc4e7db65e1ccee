"""The public Python API: `Store` holds a `Manifest` (is not one), options are keyword-only
and checked by option objects (a misspelled name is one line), results are Reports."""

from __future__ import annotations

import inspect
import json

import pytest

import embstore
from embstore.api import Report, options_from
from embstore.errors import ExtractionError, StoreError
from embstore.manifest.database import Manifest
from embstore.store import Store
from tests.store_factory import make_store

# what each method works on: the only parameters that may be given by position
SUBJECTS = {
    "scan": {"roots"}, "speaker_items": {"speaker"}, "similar": {"item_id"}, "windows": {"item_id"},
    "cluster": {"dataset"}, "score": {"trials"}, "report": {"out"}, "export_pkl": {"out"},
    "export_kaldi": {"out"}, "export_npy": {"out"},
}


@pytest.fixture
def st(tmp_path):
    store = make_store(tmp_path, speakers=3, per_speaker=3)  # scanned, every item embedded
    yield store
    store.close()


def public_methods() -> dict[str, object]:
    return {n: f for n, f in vars(Store).items() if callable(f) and not n.startswith("_")}


def test_a_store_holds_its_manifest_and_exposes_no_plumbing(st):
    assert not isinstance(st, Manifest) and isinstance(st.manifest, Manifest)
    for plumbing in ("conn", "query", "write", "register_model", "resolve_model", "model_key", "model_arrays",
                     "done_rows", "zarr_path"):
        assert not hasattr(st, plumbing), plumbing
    assert st.path == st.manifest.path and [m.id for m in st.models()] == [m.id for m in st.manifest.models()]


def test_every_option_is_keyword_only():
    for name, method in public_methods().items():
        params = list(inspect.signature(method).parameters.values())[1:]
        positional = {p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}
        assert positional <= SUBJECTS.get(name, set()), (name, positional)


def test_a_positional_model_is_refused(st):
    with pytest.raises(TypeError):
        st.embeddings("fake")  # type: ignore[misc]


@pytest.mark.parametrize("call", [
    lambda st, tmp: st.scan([tmp], layuot="speaker"),
    lambda st, tmp: st.score(tmp / "t.txt", nrom="snorm"),
    lambda st, tmp: st.outliers(topp=3),
    lambda st, tmp: st.report(tmp / "r.html", outlier=3),
    lambda st, tmp: st.export_pkl(tmp / "out", workers=2),
])
def test_a_misspelled_option_is_one_line_naming_the_known_ones(st, tmp_path, call):
    with pytest.raises(StoreError) as caught:
        call(st, tmp_path)
    message = str(caught.value)
    assert message.startswith("unknown ") and "(known: " in message and "\n" not in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.html").exists()  # nothing was done


def test_extract_keeps_its_one_line_error(st):
    with pytest.raises(ExtractionError, match="unknown extract option"):
        st.extract(wokers=2)


def test_option_values_are_checked_when_made(st, tmp_path):
    with pytest.raises(StoreError, match="unknown layout"):
        st.scan([tmp_path], layout="flat")
    with pytest.raises(StoreError, match="--top must be at least 1"):
        st.outliers(top=0)
    with pytest.raises(StoreError, match="unknown format"):
        st.export_pkl(tmp_path / "out", fmt="csv")
    with pytest.raises(StoreError, match="threads must be at least 1"):
        st.export_pkl(tmp_path / "out", threads=0)
    with pytest.raises(StoreError, match="not both"):
        st.diarize(model="x", embedder="null:16")


def test_options_from_names_unknown_fields():
    from embstore.scan.sync import ScanOptions

    assert options_from(ScanOptions, "scan", {"jobs": 2}).jobs == 2
    with pytest.raises(StoreError, match=r"unknown scan option\(s\): a, b \(known: layout, "):
        options_from(ScanOptions, "scan", {"b": 1, "a": 2})


def test_results_are_reports_with_json_as_dict(st, tmp_path):
    reports = [
        st.scan([st.path.parent / "audio"]),
        st.export_pkl(tmp_path / "pkl"),
        st.export_npy(tmp_path / "npy"),
        st.verify(),
    ]
    for report in reports:
        assert isinstance(report, Report), type(report)
        json.dumps(report.as_dict())
    npy = reports[2].as_dict()
    # keys a kind of export has no value for are left out, as the 0.1 dicts did
    assert "speakers" not in npy and "windows" not in npy and npy["dim"] == 16
    assert npy["outcome"]["exit_status"] == 0


def test_open_returns_a_store(tmp_path):
    with embstore.open(tmp_path / "s") as st:
        assert isinstance(st, Store)
