"""`embstore report`: the page parses, every picture decodes, nothing points to the network."""

import base64
import io
import itertools
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

import embstore
from embstore.cli import cli
from embstore.errors import StoreError
from tests.store_factory import make_store

pytest.importorskip("matplotlib")

SVG_NAMESPACES = re.compile(r'\sxmlns(:\w+)?="http://www\.w3\.org/[^"]*"')


class Page(HTMLParser):
    """Tags, attributes, section ids and table cells of an HTML page."""

    VOID = {"meta", "br", "img", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.sections, self.cells, self.open = [], [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "section":
            self.sections.append(dict(attrs)["id"])
        if tag in ("td", "th"):
            self._cell = ""
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def check_page(path):
    """Parse the report and check it stands alone; returns the parsed page."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    page = Page()
    page.feed(text)
    page.close()
    assert page.open == [], page.open[-5:]
    # no script at all, no external reference of any kind
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    for tag, key, value in page.attrs:
        if key in ("src", "href", "xlink:href", "action", "data"):
            assert value.startswith(("#", "data:")), (tag, key, value)
    stripped = SVG_NAMESPACES.sub("", text)
    assert "http://" not in stripped and "https://" not in stripped and "url(" not in stripped.replace("url(#", "")
    # every picture decodes
    svgs = re.findall(r"<svg\b.*?</svg>", text, re.S)
    for svg in svgs:
        root = ET.fromstring(svg)
        assert root.tag == "{http://www.w3.org/2000/svg}svg" and len(list(root.iter())) > 10
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    if pngs:
        from PIL import Image

        for data in pngs:
            Image.open(io.BytesIO(base64.b64decode(data, validate=True))).verify()
    page.svgs = len(svgs)
    return page


def add_runs_and_failures(st):
    """Two extraction runs as the supervisor records them, a failed task, a scan failure."""
    model_id = st.models()[0].id
    with st.manifest.write() as conn:
        for k, (started, rt) in enumerate([("2026-11-01T10:00:00+00:00", 180.0), ("2026-11-02T09:30:00+00:00", 240.5)]):
            summary = {"x_realtime": rt, "items_per_second": rt / 8, "mean_batch_items": 12.5 + k,
                       "padding_overhead": 0.03 * k, "failed": k, "done": 6, "batching": "any", "runtime": "torch"}
            conn.execute(
                "INSERT INTO runs (model_id, host, pid, options, started_at, ended_at, status, items_done,"
                " items_failed, audio_seconds, summary) VALUES (?, 'h', 1, '{}', ?, ?, 'finished', 6, ?, 48.0, ?)",
                (model_id, started, started.replace("T10:00", "T10:05").replace("T09:30", "T09:31"), k,
                 json.dumps(summary)),
            )
        conn.execute(
            "UPDATE tasks SET status = 'failed', stage = 'decode', error = 'cannot decode /data/x/y.flac: bad header'"
            " WHERE item_id = (SELECT id FROM items WHERE uid = 'ds/spk1/utt3')"
        )
        # a speaker name that is HTML: it must come out escaped
        conn.execute("UPDATE items SET speaker = '<script>alert(1)</script>' WHERE speaker = 'spk3'")


@pytest.fixture(scope="module")
def report_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    st = make_store(tmp, speakers=4, per_speaker=6, dim=16)
    add_runs_and_failures(st)
    broken = tmp / "audio" / "ds" / "spk0" / "broken.wav"
    broken.write_bytes(b"RIFF....not audio")
    st.scan([tmp / "audio"])
    # a planted label error for the outliers section
    with st.manifest.write() as conn:
        conn.execute("UPDATE items SET speaker = 'spk2' WHERE uid = 'ds/spk0/utt4'")
    ids = [r["uid"] for r in st.manifest.query("SELECT uid FROM items WHERE removed = 0 ORDER BY uid")]
    trials = tmp / "trials.txt"
    trials.write_text("".join(
        f"{a} {b} {'target' if a.split('/')[1] == b.split('/')[1] else 'nontarget'}\n"
        for a, b in itertools.combinations(ids, 2)
    ))
    yield st, trials
    st.close()


def test_report_without_trials(report_store, tmp_path):
    st, _ = report_store
    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", str(st.path), "-o", str(out)])
    # the store has a failed item: the report is written, and the exit status says one is missing
    assert result.exit_code == 3, result.output
    assert f"wrote {out}" in result.output and "1 item failed: see `embstore errors" in result.output
    page = check_page(out)
    assert page.sections == ["summary", "durations", "speakers", "runs", "failures", "outliers"]
    # durations, items per speaker, runs over time, failures: one picture each
    assert page.svgs == 4
    cells = page.cells
    assert "ds" in cells and "fake" in cells
    failures = cells[cells.index("where"):][:9]
    assert failures[3:6] == ["fake", "decode: cannot decode <path>: bad header", "1"]  # grouped, path masked
    assert failures[6] == "scan" and "unreadable header" in failures[7]
    assert "240.5" in cells and "2026-11-02T09:30:00+00:00" in cells  # the runs table
    assert "ds/spk0/utt4" in cells[cells.index("nearest other speaker"):][:20]  # the planted outlier, near the top
    text = out.read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_report_with_trials_and_norms(report_store, tmp_path):
    st, trials = report_store
    out = tmp_path / "r.html"
    result = st.report(out, trials=[trials], norm="none,asnorm", cohort="dataset:ds", top_n=2)
    assert result.sections[-2:] == ["scoring", "outliers"]
    page = check_page(out)
    # the four store pictures + one DET + one histogram figure for the list
    assert page.svgs == 6
    cells = page.cells
    header = cells.index("EER %")
    assert "trials.txt" in cells and "asnorm2" in cells and "minDCF 0.01" in cells and header > 0


def test_report_of_a_store_without_embeddings(tmp_path):
    from tests.store_factory import make_tree

    make_tree(tmp_path / "audio", speakers=2, per_speaker=2)
    st = embstore.open(tmp_path / "store")
    st.scan([tmp_path / "audio"])
    out = tmp_path / "empty.html"
    st.report(out)
    page = check_page(out)
    text = out.read_text()
    assert "No model has been run on this store yet" in text and "No extraction runs recorded" in text
    assert page.svgs == 2  # durations and items per speaker
    trials = tmp_path / "t.txt"
    trials.write_text("a b target\n")
    with pytest.raises(StoreError, match="holds no embeddings yet"):
        st.report(out, trials=[trials], model="m")
    st.close()


def test_report_bad_inputs(report_store, tmp_path):
    st, trials = report_store
    runner = CliRunner()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for args, message in [
        (["--trials", str(empty)], "no trials in the file"),
        (["--trials", str(trials), "--norm", "snorm"], "--norm snorm needs --cohort"),
        (["--outliers", "0"], "--outliers must be at least 1"),
        (["--trials", str(tmp_path / "absent.txt")], "does not exist"),
    ]:
        result = runner.invoke(cli, ["report", str(st.path), "-o", str(tmp_path / "r.html"), *args])
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "r.html").exists()
