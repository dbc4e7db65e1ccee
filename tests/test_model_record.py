"""One typed record per model (`ModelRecord`), built in one place from the `models` row;
one reference embedding as the store made its rows (`extract.reference`); every SQL
statement on `tasks` and every parse of a model's frontend inside `embstore/manifest/`."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from embstore.errors import ExtractionError
from embstore.extract.reference import ReferenceEmbedder, embed_as_stored, open_encoder_for
from embstore.manifest.database import Manifest
from embstore.manifest.registry import DEFAULT_COMPUTE_DTYPE, ModelRecord, model_row
from embstore.models.null import NullEncoder
from embstore.segments.policy import Cutting, cutting_of_model
from tests.audio_factory import write

PACKAGE = Path(__file__).resolve().parents[1] / "embstore"
MANIFEST = PACKAGE / "manifest"


@pytest.fixture
def manifest(tmp_path):
    with Manifest(tmp_path / "store") as m:
        yield m


def whole_description() -> dict:
    return NullEncoder(16).describe()


def window_description() -> dict:
    # as the plan makes a window model: the encoder's description through the run's cutting
    encoder = NullEncoder(16)
    return Cutting("none", "1.5:0.75").model_description(encoder.describe(), encoder.capabilities.runtime)


# -- the record ---------------------------------------------------------------------------


def test_a_whole_item_model_round_trips(manifest):
    description = whole_description()
    record = manifest.register_model(description)
    assert isinstance(record, ModelRecord)
    assert (record.name, record.spec, record.fingerprint) == ("null-16", "null:16", description["fingerprint"])
    assert (record.dim, record.sample_rate, record.batching, record.kind) == (16, 16000, "any", "item")
    assert record.frontend == description["frontend"] and record.rows == 0
    assert record.array_path == f"m{record.id}-{record.fingerprint[:12]}"
    assert record.cutting is None and record.window_spec is None and not record.windowed
    assert cutting_of_model(record.frontend) is None
    # every way of reading it gives the same record
    assert manifest.register_model(description) == record
    assert manifest.resolve_model() == record == manifest.resolve_model("null:16")
    assert model_row(manifest.conn, record.id) == record and manifest.models() == [record]
    # columns are attributes only: indexing like the sqlite3.Row it replaced is an error
    with pytest.raises(TypeError):
        record["dim"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.rows = 5  # type: ignore[misc]


def test_a_window_model_round_trips(manifest):
    manifest.register_model(whole_description())
    description = window_description()
    record = manifest.register_model(description)
    assert record.kind == "windows" and record.windowed and record.name == "null-16+w1.5:0.75"
    assert record.fingerprint == description["fingerprint"] != whole_description()["fingerprint"]
    assert record.frontend == description["frontend"]
    assert (record.window_spec["window"], record.window_spec["shift"]) == (1.5, 0.75)
    assert record.window_mode == description["frontend"]["cutting"]["window_embedding"]["mode"]
    assert manifest.resolve_model(kind="windows") == record
    assert manifest.resolve_model("null:16", kind="item").kind == "item"  # one spec, two models
    cutting = cutting_of_model(record.frontend)
    assert cutting is not None and cutting.label() == "w1.5:0.75" and cutting.mode == record.window_mode
    # the rebuilt cutting describes the rows exactly as the plan did: same fingerprint
    again = cutting.model_description(whole_description(), NullEncoder(16).capabilities.runtime)
    assert again["fingerprint"] == record.fingerprint


def test_compute_dtype_defaults_in_one_place(manifest):
    plain = dict(whole_description(), frontend={"fake": True}, fingerprint="a" * 24)
    bf16 = dict(whole_description(), frontend={"compute_dtype": "bf16"}, fingerprint="b" * 24)
    assert manifest.register_model(plain).compute_dtype == DEFAULT_COMPUTE_DTYPE == "fp32"
    assert manifest.register_model(bf16).compute_dtype == "bf16"
    # nowhere else defaults it: every reader asks the record
    defaults = [path for path in PACKAGE.rglob("*.py")
                if re.search(r"""\.get\(\s*["']compute_dtype["']""", path.read_text(encoding="utf-8"))]
    assert defaults == [MANIFEST / "registry.py"]


# -- embedding as stored ------------------------------------------------------------------


def test_embed_as_stored_follows_the_record(manifest, tmp_path):
    path = write(tmp_path / "a.wav", seconds=3.0)
    encoder = NullEncoder(16)
    whole = manifest.register_model(whole_description())
    rows = embed_as_stored(whole, path)
    assert rows.shape == (1, 16) and np.allclose(rows[0], encoder.vector)
    windows = manifest.register_model(window_description())
    reference = ReferenceEmbedder(windows)
    # 3 s in 1.5 s windows every 0.75 s: 0-1.5, 0.75-2.25, 1.5-3.0
    assert reference.embed(path).shape == (3, 16)
    assert reference.embed(path, 0.0, 1.2).shape == (1, 16)  # shorter than a window: one short one


def test_a_model_that_changed_is_refused(manifest):
    record = manifest.register_model(whole_description())
    assert open_encoder_for(record).fingerprint == record.fingerprint
    changed = dataclasses.replace(record, fingerprint="0" * 24)
    with pytest.raises(ExtractionError, match="not comparable"):
        open_encoder_for(changed)


# -- what lives only in manifest/ ---------------------------------------------------------

TASKS_SQL = re.compile(r"\b(FROM|JOIN|UPDATE|INTO)\s+tasks\b")


def _strings(tree: ast.AST) -> list[str]:
    """Every string literal of a module, an f-string with its holes as `{}` (adjacent
    literals are one string to the parser already)."""
    out = []
    parts = set()  # the literal pieces of f-strings, counted with their f-string
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            out.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
            parts.update(id(v) for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts:
            out.append(node.value)
    return out


def sql_on_tasks(source: str) -> list[str]:
    return [s for s in _strings(ast.parse(source)) if TASKS_SQL.search(s)]


def frontend_parses(source: str) -> list[str]:
    """`json.loads(...)` calls whose argument mentions a frontend."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "loads"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "json"
                and "frontend" in ast.unparse(node)):
            out.append(ast.unparse(node))
    return out


def outside_manifest() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE.parent)): p.read_text(encoding="utf-8")
            for p in sorted(PACKAGE.rglob("*.py")) if MANIFEST not in p.parents}


def test_the_checks_see_what_they_look_for():
    code = (
        'a = conn.execute("SELECT row " "FROM tasks WHERE id = ?")\n'
        'b = f"SELECT {x} FROM items i JOIN tasks t ON t.item_id = i.id"\n'
        'c = "UPDATE tasks SET status = ?"\n'
        '"""Workers take tasks from the queue: prose, not SQL."""\n'
        'd = json.loads(row["frontend"] or "{}")\n'
        'e = json.loads(run["summary"])\n'
    )
    assert len(sql_on_tasks(code)) == 3
    assert frontend_parses(code) == ["json.loads(row['frontend'] or '{}')"]


def test_no_sql_on_tasks_outside_manifest():
    found = {path: hits for path, source in outside_manifest().items() if (hits := sql_on_tasks(source))}
    assert not found, f"SQL on `tasks` belongs in embstore/manifest/: {found}"


def test_no_frontend_parsed_outside_manifest():
    found = {path: hits for path, source in outside_manifest().items() if (hits := frontend_parses(source))}
    assert not found, f"a model's frontend is parsed once, into ModelRecord: {found}"
