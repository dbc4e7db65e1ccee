"""Security guards: exports stay inside their folder even when their own manifest is
tampered with; the package never unpickles what it did not write."""

from __future__ import annotations

import ast
import os
import sqlite3
from pathlib import Path

import embstore
from tests.store_factory import make_store

PACKAGE = Path(embstore.__file__).resolve().parent


def test_a_tampered_export_manifest_never_deletes_outside_out(tmp_path):
    st = make_store(tmp_path, speakers=1, per_speaker=2)
    out = tmp_path / "out"
    st.export_pkl(out)
    victims = [tmp_path / "victim.pkl", tmp_path / "elsewhere" / "victim2.pkl", tmp_path / "victim3.pkl"]
    for v in victims:
        v.parent.mkdir(parents=True, exist_ok=True)
        v.write_bytes(b"not yours")
    os.symlink(victims[2], out / "ds" / "link.pkl")
    # items that are "gone" from the store, whose recorded paths lead outside OUT
    conn = sqlite3.connect(str(out / ".embstore-export.db"))
    fp = conn.execute("SELECT fingerprint FROM files LIMIT 1").fetchone()[0]
    for uid, path in (("ghost1", "../victim.pkl"), ("ghost2", str(victims[1])), ("ghost3", "ds/link.pkl")):
        conn.execute("INSERT INTO files VALUES (?, ?, 0, ?, 'ds', 'spk0', 'x')", (uid, fp, path))
    conn.commit()
    conn.close()
    report = st.export_pkl(out)
    assert report.removed == 0
    assert all(v.read_bytes() == b"not yours" for v in victims)
    # the entries were seen as gone (so their paths were offered for deletion) and forgotten
    conn = sqlite3.connect(str(out / ".embstore-export.db"))
    assert conn.execute("SELECT count(*) FROM files WHERE uid LIKE 'ghost%'").fetchone()[0] == 0
    conn.close()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield owner, name, node


def test_the_package_never_unpickles_foreign_files():
    """torch.load only with weights_only=True; no pickle.load, allow_pickle or yaml.load."""
    bad = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for owner, name, node in _calls(tree):
            kwargs = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            if owner == "torch" and name == "load":
                value = kwargs.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    bad.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "cPickle", "dill", "joblib") and name in ("load", "loads"):
                bad.append(f"{where}: {owner}.{name}")
            if name == "load" and owner in ("np", "numpy"):
                value = kwargs.get("allow_pickle")
                if isinstance(value, ast.Constant) and value.value is True:
                    bad.append(f"{where}: numpy.load(allow_pickle=True)")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                bad.append(f"{where}: yaml.{name}")
    assert bad == []
