"""The public Python API: `Store` holds a `Manifest` (is not one), options are keyword-only
and checked by option objects (a misspelled name is one line), results are Reports."""

from __future__ import annotations

import inspect
import itertools
import json
from typing import Any

import pytest
from click.testing import CliRunner

import embstore
from embstore.api import (
    ClusterReport, DiarizeReport, ErrorsReport, Failure, Outlier, OutliersReport, Report, ScoreReport, StatusReport,
    options_from,
)
from embstore.cli import cli
from embstore.errors import ExtractionError, StoreError
from embstore.manifest.database import Manifest
from embstore.store import Store
from tests.audio_factory import write
from tests.store_factory import fill_embeddings, make_store, make_tree

# what each method works on: the only parameters that may be given by position
SUBJECTS = {
    "scan": {"roots"}, "speaker_items": {"speaker"}, "similar": {"item_id"}, "windows": {"item_id"},
    "cluster": {"dataset"}, "score": {"trials"}, "report": {"out"}, "export_pkl": {"out"},
    "export_kaldi": {"out"}, "export_npy": {"out"}, "export_lhotse": {"out"}, "export_parquet": {"out"},
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


# -- the analyses' reports are what their commands print -----------------------------------


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A store with something in every report: 3 speakers x 3 items of 2 s embedded by the
    fake model, an unreadable file (a scan failure), a window model from `diarize` whose
    extraction failed one 0.2 s item (shorter than a window), and a trial list."""
    tmp = tmp_path_factory.mktemp("analysed")
    root = tmp / "audio"
    make_tree(root, speakers=3, per_speaker=3, seconds=2.0)
    write(root / "ds" / "spk0" / "short.wav", 0.2, seed=99)
    (root / "ds" / "spk1" / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    with embstore.open(tmp / "store", create=True) as st:
        st.scan([root])
        fill_embeddings(st, dim=16)
        windows = st.diarize(windows="1.5:0.75", vad="none", embedder="null:16", workers=1).model
        ids = [r["uid"] for r in st.manifest.query("SELECT uid FROM items ORDER BY uid")]
    trials = tmp / "trials.txt"
    trials.write_text("".join(f"{a} {b} {'target' if a.split('/')[1] == b.split('/')[1] else 'nontarget'}\n"
                              for a, b in itertools.combinations(ids, 2)))
    return {"store": str(tmp / "store"), "windows": windows, "trials": str(trials)}


def printed_and_returned(monkeypatch, method: str, args: list[str]) -> tuple[Any, Report]:
    """What `embstore ARGS --json` printed, and the report the `Store` method it called
    returned to it (a spy on the method: the very object the command printed from)."""
    returned = []
    real = getattr(Store, method)

    def spy(self, *a, **kw):
        returned.append(real(self, *a, **kw))
        return returned[-1]

    monkeypatch.setattr(Store, method, spy)
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert len(returned) == 1, result.output
    return json.loads(result.stdout), returned[0]


def as_printed(value: Any) -> Any:
    """`value` as `--json` prints it (strings for what JSON has no type for)."""
    return json.loads(json.dumps(value, default=str))


# (the Store method, its command, the report, whether its --json is the report's dict,
# and the keys in order of what --json prints or of each of its rows: as 0.2.0 printed them)
ANALYSES = {
    "status": (["status", "{store}"], StatusReport, True,
               ["store", "files", "items", "speakers", "datasets", "audio_seconds", "scan_failed",
                "removed_files", "models", "scan_failures_by_reason"]),
    "errors": (["errors", "{store}"], ErrorsReport, False, ["id", "path", "stage", "error", "attempts", "model"]),
    "score": (["score", "{store}", "{trials}", "--model", "fake"], ScoreReport, False,
              ["list", "path", "norm", "trials", "targets", "nontargets", "missing", "missing_ids",
               "missing_ids_total", "eer", "eer_threshold", "min_dcf", "min_dcf_threshold", "act_dcf", "model"]),
    "outliers": (["outliers", "{store}", "--model", "fake", "--top", "4"], OutliersReport, False,
                 ["id", "speaker", "dataset", "score", "items", "nearest_speaker", "nearest_score", "margin"]),
    "cluster": (["cluster", "{store}", "--dataset", "ds", "--model", "fake"], ClusterReport, True,
                ["dataset", "model", "items", "embedded", "rows", "clustered", "unlabelled", "clusters",
                 "algorithm", "threshold", "num_speakers", "speakers", "purity", "coverage", "seconds",
                 "stage_seconds", "outcome"]),
    "diarize": (["diarize", "{store}", "--model", "{windows}"], DiarizeReport, True,
                ["model", "items", "computed", "failed", "reused", "speakers", "speech_seconds", "seconds",
                 "extraction", "segments", "outcome"]),
}


@pytest.mark.parametrize("method", sorted(ANALYSES))
def test_an_analysis_returns_the_report_its_command_prints(analysed, monkeypatch, method):
    command, cls, printed_as_dict, keys = ANALYSES[method]
    printed, report = printed_and_returned(monkeypatch, method, [a.format(**analysed) for a in command])
    assert type(report) is cls and isinstance(report, Report)
    assert printed == as_printed(report.as_json())
    if printed_as_dict:
        assert printed == as_printed(report.as_dict()) and list(printed) == keys
    else:  # a list since 0.1, one object per row; never empty here
        assert printed and all(list(row) == keys for row in printed), printed


def test_list_reports_hold_typed_rows_and_their_dict_holds_the_rows(analysed):
    with embstore.open(analysed["store"]) as st:
        errors = st.errors()
        outliers = st.outliers(model="fake", top=4)
        score = st.score(analysed["trials"], model="fake")
    assert all(isinstance(f, Failure) for f in errors.failures)
    # the window model failed the short item; the unreadable file has no item and no model
    assert [(f.stage, f.id, f.model) for f in errors.failures] == [
        ("windows", "ds/spk0/short", analysed["windows"]), ("scan", None, None)], errors
    assert errors.as_dict() == {"failures": errors.as_json()}
    assert all(isinstance(o, Outlier) for o in outliers.outliers) and len(outliers.outliers) == 4
    assert outliers.as_dict() == {"outliers": outliers.as_json()}
    assert [dict(r, model="fake") for r in score.as_dict()["results"]] == score.as_json()
    assert score.as_dict()["outcome"]["exit_status"] == score.outcome.exit_status == 0


def test_a_diarize_report_keeps_the_extraction_as_it_was(analysed):
    with embstore.open(analysed["store"]) as st:
        report = st.diarize(model=analysed["windows"])
    # nothing was left to extract: the extraction's own outcome is not the report's
    assert report.extraction.nothing_to_do and report.outcome is not report.extraction.outcome
    d = report.as_dict()
    assert d["extraction"] == report.extraction.as_dict()
    assert all(isinstance(s, list) and len(s) == 3 for segs in d["segments"].values() for s in segs)
    assert report.outcome.failed == 1 and d["outcome"]["exit_status"] == 3  # the short item


def test_a_cluster_report_leaves_out_what_the_run_has_no_value_for(analysed):
    with embstore.open(analysed["store"]) as st:
        report = st.cluster("ds", model="fake", num_speakers=3)
    d = report.as_dict()
    assert report.algorithm == "ahc" and report.cells is None and "cells" not in d and "passes" not in d
    assert report.purity is not None and d["purity"] == report.purity  # 3 real speakers: compared
    assert d["threshold"] is None and d["num_speakers"] == 3  # None, yet always printed
