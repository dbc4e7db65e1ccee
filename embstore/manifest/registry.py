"""The `models` table: one row per model fingerprint, read as a `ModelRecord`, and how
users name models."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from embstore.errors import StoreError
from embstore.manifest.connection import immediate, utcnow

# what a model computes in when its frontend record does not say (models registered
# before the dtype was recorded computed in fp32)
DEFAULT_COMPUTE_DTYPE = "fp32"
# what a model runs on when its frontend record does not say: only OpenVINO models
# record a runtime; ONNX runs store their rows under the torch model's record
DEFAULT_RUNTIME = "torch"


@dataclass(frozen=True)
class ModelRecord:
    """One row of `models`, typed: what made a model's rows and where they are.

    Built by `model_record` only. `rows` is the committed row count when the row was
    read (the writer advances it; read the record again for the current count).
    `frontend` is the parsed JSON: every setting of the encoder that changes the rows,
    plus the run's cutting (`cutting`), `compute_dtype`, `runtime`, `max_trim_frames`.
    Columns are attributes only: `record["dim"]` is a TypeError, so a plain SQL row
    cannot pass for a record (or a record for a row) unnoticed."""

    id: int
    name: str
    spec: str
    fingerprint: str
    dim: int
    sample_rate: int
    batching: str  # any | masked | equal
    kind: str  # item | windows
    array_path: str  # the model's group inside embeddings.zarr
    rows: int
    created_at: str
    # a dict is not hashable: records compare by value and are never hashed
    frontend: dict[str, Any] = field(hash=False)

    @property
    def compute_dtype(self) -> str:
        """The precision the rows were computed in (fp32, bf16, fp16, tf32)."""
        return str(self.frontend.get("compute_dtype", DEFAULT_COMPUTE_DTYPE))

    @property
    def runtime(self) -> str:
        return str(self.frontend.get("runtime", DEFAULT_RUNTIME))

    @property
    def cutting(self) -> dict[str, Any] | None:
        """How each item was cut before the model ({"vad": ..., "windows": ...,
        "window_embedding": ...}); None for plain whole items."""
        return self.frontend.get("cutting") or None

    @property
    def window_spec(self) -> dict[str, Any] | None:
        """A window model's windows ({"window": s, "shift": s, "last": the policy});
        None for whole-item models."""
        return (self.cutting or {}).get("windows") or None

    @property
    def window_mode(self) -> str:
        """How the windows were embedded (the mode the fingerprint was made with)."""
        return (self.cutting or {}).get("window_embedding", {}).get("mode", "auto")

    @property
    def max_trim_frames(self) -> int | None:
        """The trim equal-length batching was allowed (None: batches were not trimmed)."""
        return self.frontend.get("max_trim_frames")

    @property
    def windowed(self) -> bool:
        return self.kind == "windows"


def model_record(row: sqlite3.Row) -> ModelRecord:
    """The one way a `models` row becomes a record: the frontend JSON parsed here."""
    return ModelRecord(
        id=int(row["id"]), name=row["name"], spec=row["spec"], fingerprint=row["fingerprint"], dim=int(row["dim"]),
        sample_rate=int(row["sample_rate"]), batching=row["batching"], kind=row["kind"],
        array_path=row["array_path"], rows=int(row["rows"]), created_at=row["created_at"],
        frontend=json.loads(row["frontend"] or "{}"),
    )


def model_row(conn: sqlite3.Connection, model_id: int) -> ModelRecord:
    row = conn.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
    if row is None:
        raise StoreError(f"no model with id {model_id} in the store")
    return model_record(row)


def register_model(conn: sqlite3.Connection, description: dict[str, Any]) -> ModelRecord:
    """The `models` row for an encoder's description, created on first use."""
    fp = description["fingerprint"]
    row = conn.execute("SELECT * FROM models WHERE fingerprint = ?", (fp,)).fetchone()
    if row is not None:
        return model_record(row)
    with immediate(conn):
        row = conn.execute("SELECT * FROM models WHERE fingerprint = ?", (fp,)).fetchone()
        if row is None:
            cur = conn.execute(
                "INSERT INTO models (name, spec, fingerprint, dim, sample_rate, batching, frontend,"
                " array_path, rows, created_at, kind) VALUES (?, ?, ?, ?, ?, ?, ?, '', 0, ?, ?)",
                (
                    description["name"], description["spec"], fp, int(description["dim"]),
                    int(description["sample_rate"]), description["batching"],
                    json.dumps(description.get("frontend", {}), sort_keys=True, default=str), utcnow(),
                    description.get("kind", "item"),
                ),
            )
            model_id = cur.lastrowid
            conn.execute("UPDATE models SET array_path = ? WHERE id = ?", (f"m{model_id}-{fp[:12]}", model_id))
            row = conn.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
    return model_record(row)


def model_rows(conn: sqlite3.Connection) -> list[ModelRecord]:
    return [model_record(r) for r in conn.execute("SELECT * FROM models ORDER BY id")]


def models_of_spec(conn: sqlite3.Connection, spec: str) -> list[ModelRecord]:
    """The models made from one spec (any cutting, any fingerprint), newest first."""
    return [model_record(r) for r in conn.execute("SELECT * FROM models WHERE spec = ? ORDER BY id DESC", (spec,))]


def model_key(conn: sqlite3.Connection, row: ModelRecord) -> str:
    """How a model is named to users: its name, plus the fingerprint when names repeat."""
    same = conn.execute("SELECT count(*) FROM models WHERE name = ?", (row.name,)).fetchone()[0]
    return row.name if same == 1 else f"{row.name}@{row.fingerprint[:8]}"


def resolve_model(conn: sqlite3.Connection, where: str, model: str | None = None, kind: str | None = "item") -> ModelRecord:
    """A model row by name, spec, `name@fp` or fingerprint prefix; None = the only one
    (of `kind`: "item" for whole-item questions, "windows" for window ones, None: any)."""
    rows = model_rows(conn)
    if not rows:
        raise StoreError(f"{where} holds no embeddings yet; run `embstore extract` first")
    if model is None:
        of_kind = [r for r in rows if kind is None or r.kind == kind]
        if len(of_kind) == 1:
            return of_kind[0]
        if not of_kind:
            other = ", ".join(model_key(conn, r) for r in rows)
            if kind == "windows":
                raise StoreError(f"{where} holds no window embeddings (it has: {other}); run `embstore extract"
                                 " --windows 1.5:0.75` first")
            raise StoreError(f"{where} holds only window embeddings ({other}); this needs whole-item embeddings:"
                             " run `embstore extract` first")
        names = ", ".join(model_key(conn, r) for r in of_kind)
        raise StoreError(f"the store holds several models ({names}); pick one with --model")
    matches = [
        r for r in rows
        if model in (r.name, r.spec, model_key(conn, r)) or r.fingerprint.startswith(model)
    ]
    if len(matches) > 1 and kind is not None:
        # a spec names whole-item and window models of one network alike
        matches = [r for r in matches if r.kind == kind] or matches
    if len(matches) == 1:
        found = matches[0]
        if kind is not None and found.kind != kind:
            key = model_key(conn, found)
            if found.kind == "windows":
                raise StoreError(f"{key} holds window embeddings; this needs a whole-item model (see `embstore"
                                 " windows` and `embstore diarize` for windows)")
            raise StoreError(f"{key} holds whole-item embeddings; this needs a window model (`embstore extract"
                             " --windows`)")
        return found
    if not matches:
        names = ", ".join(model_key(conn, r) for r in rows)
        raise StoreError(f"no model {model!r} in the store (it has: {names})")
    names = ", ".join(model_key(conn, r) for r in matches)
    raise StoreError(f"model {model!r} is ambiguous ({names}); use name@fingerprint")
