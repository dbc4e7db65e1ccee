import pytest

import embstore
from embstore.manifest.schema import LATEST, migrations
from embstore.errors import NewerStoreError, StoreError


def test_fresh_store_has_every_migration_and_wal(tmp_path):
    st = embstore.open(tmp_path / "s")
    applied = [m.name for m in migrations.applied(st.db)]
    assert applied == LATEST
    assert st.manifest.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert st.manifest.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    tables = set(st.db.table_names())
    assert {"files", "items", "models", "tasks", "runs", "roots"} <= tables


def test_store_from_first_migration_upgrades_in_place(tmp_path):
    from sqlite_utils import Database

    (tmp_path / "s").mkdir()
    db = Database(tmp_path / "s" / "manifest.db")
    migrations.apply(db, stop_before=LATEST[1])
    db.execute(
        "INSERT INTO roots (kind, path, created_at) VALUES ('tree', '/x', 'now')"
    )
    db.conn.commit()
    assert "stage" not in db["tasks"].columns_dict
    db.close()
    st = embstore.open(tmp_path / "s")
    assert "stage" in st.db["tasks"].columns_dict
    assert st.manifest.query("SELECT path FROM roots")[0][0] == "/x"  # data kept


def test_store_from_newer_version_is_refused_clearly(tmp_path):
    st = embstore.open(tmp_path / "s")
    st.manifest.conn.execute(
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES ('embstore', 'm999_future', 'x')"
    )
    st.close()
    with pytest.raises(NewerStoreError, match="newer embstore"):
        embstore.open(tmp_path / "s")


def test_open_without_create_needs_a_store(tmp_path):
    with pytest.raises(StoreError, match="no store"):
        embstore.open(tmp_path / "missing", create=False)


def test_status_of_empty_store(tmp_path):
    status = embstore.open(tmp_path / "s").status()
    for key in ("files", "items", "speakers", "datasets", "audio_seconds", "scan_failed", "models"):
        assert key in status.as_dict()
    assert status.files == 0 and status.models == {}
