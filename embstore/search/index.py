"""One model's approximate-nearest-neighbour index in `STORE/cache/<array>/`: built,
extended, published and opened.

Which index (by committed rows N):

- N < `IVF_MIN_ROWS` (200 k): none. The exact scan of the normalised-row cache takes
  ~20 ms at 200 k rows, as fast as any index, and is exact ("flat").
- otherwise FAISS IVF + SQ8 (`IVF{lists},SQ8`, inner product on unit rows): `lists_for(N)`
  inverted lists (the power of two nearest sqrt N: 1,024 at 1 M rows, 4,096 at 10 M),
  spherical k-means (10 iterations) on `TRAIN_PER_LIST` rows per list, codes SQ8 (1 byte
  per dimension) of each row's residual to its list's centroid. From
  `HNSW_QUANTIZER_LISTS` lists on, rows find their list through an HNSW graph of the
  centroids (`IVF{lists}_HNSW32,SQ8`) rather than against every centroid. Memory:
  dim + 8 bytes a row (the codes, and the row number as id): 200 B at dim 192; plus the
  centroids (lists x dim x 4 bytes, and the graph). Candidates from the index are
  re-ranked exactly from the normalised rows (`knn`), so a score is always the exact
  cosine; only whether a true neighbour is among the candidates is approximate.

Bounded memory: rows stream block by block (`BLOCK_ROWS`) from the normalised-row cache
(a memory map). In memory at once: the training sample (`TRAIN_PER_LIST` x lists rows, at
most `MAX_TRAIN` = 327,680 rows x dim x 4 bytes: 252 MB at dim 192), one block (50 MB)
and the index being built (its codes: 200 B a row).

Incremental: rows committed after a build are added to the lists without retraining.
Drift bound: the index is retrained from scratch once (a) the rows added since training
exceed the rows it was trained on (the lists' sizes then doubled on average, and queries
slow down in proportion), or (b) the mean residual (1 - cosine to the nearest centroid)
of the added rows exceeds `DRIFT_RESIDUAL` x that of the training rows (new data the
centroids do not describe: recall at a fixed nprobe falls). Whether new rows would cross
the bound is estimated before they are added (their residual on every 16th row):
`embstore index` then retrains instead; a query that extends a lagging index by itself
extends it anyway (it never pays for a retraining). Until the index is brought up to
date, rows past it are scanned exactly, so a lagging index never hides rows.

Publishing: the index is written to a new file `ivf-<token>.faiss` (fsynced), then
`index.json` (the committed row count it covers, the model fingerprint, the live-item
generation, the training figures) is replaced atomically to name it. A reader reads
`index.json` and then the file it names: it never sees a half-written index. A build
killed at any point leaves the previous `index.json` and its file intact; its temporary
file is deleted by the next build. Removed and stale items are never returned from any
index: every candidate row is mapped back to live items through the manifest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from embstore.api import Report
from embstore.arrays.unit_cache import UnitRows, unit_rows
from embstore.errors import StoreError
from embstore.manifest.connection import utcnow
from embstore.manifest.database import Manifest
from embstore.manifest.registry import ModelRecord
from embstore.manifest.tasks import committed_rows
from embstore.paths import file_lock, write_atomic_text

IVF_MIN_ROWS = 200_000
HNSW_QUANTIZER_LISTS = 4096
# the HNSW quantizer's beam while adding rows: finds the nearest list for ~92 % of rows
# (the rest go to a near one, which queries probing several lists still reach) at a third
# of the time of a beam of 64
ADD_EF_SEARCH = 16
TRAIN_PER_LIST = 40
MAX_TRAIN = 327_680
KMEANS_ITERATIONS = 10
BLOCK_ROWS = 65_536
DRIFT_ROWS = 1.0
DRIFT_RESIDUAL = 1.25
META_NAME = "index.json"
LOCK_NAME = ".index.lock"
KINDS = ("auto", "ivf", "flat")


@dataclass
class IndexMeta:
    """What `index.json` records of the published index."""

    kind: str
    file: str
    rows: int
    trained_rows: int
    lists: int
    nprobe: int
    dim: int
    fingerprint: str
    generation: str
    train_residual: float
    added_rows: int
    added_residual: float
    built_at: str

    def drifted(self) -> str | None:
        """Why the index must be retrained rather than extended, or None."""
        if self.added_rows > DRIFT_ROWS * self.trained_rows:
            return f"{self.added_rows} rows added since training on {self.trained_rows}"
        if self.added_rows and self.added_residual > DRIFT_RESIDUAL * self.train_residual:
            return (f"added rows sit {self.added_residual / max(self.train_residual, 1e-9):.2f}x as far from"
                    " their centroids as the training rows")
        return None


def lists_for(rows: int) -> int:
    """Inverted lists for `rows`: the power of two nearest sqrt(rows), at least 64 (1,024
    at 1 M rows, 4,096 at 10 M, 8,192 at 100 M). FAISS suggests 4-16 sqrt(rows) for the
    fastest queries; on 2 cores the k-means and the rows' assignment to lists grow with
    the lists, and sqrt(rows) keeps a 10 M-row build under 20 minutes while a query still
    reads only nprobe x sqrt(rows) codes (~130 k at 10 M: a few ms)."""
    return max(64, 2 ** round(math.log2(math.sqrt(max(rows, 1)))))


def tune(index: Any, nprobe: int, ef_search: int | None = None) -> None:
    """Set the lists probed per query (and the HNSW quantizer's beam to match)."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = nprobe
    # FAISS splits a batch of queries across threads, so a single query (`similar`) used
    # one core; mode 1 splits each query's probed lists across threads instead: half the
    # latency on 2 cores, and batches (near-duplicates) ~5 % slower (measured, 2 M rows)
    ivf.parallel_mode = 1
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = ef_search or max(64, 2 * nprobe)


def search_params(index: Any, nprobe: int) -> Any:
    """Per-call search parameters probing `nprobe` lists: the loaded index is shared by
    every query of the process (threads too), so a query that wants more or fewer lists
    says so per call instead of retuning the index under the others."""
    faiss = _faiss()
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if hasattr(quantizer, "hnsw"):
        return faiss.SearchParametersIVF(nprobe=nprobe, quantizer_params=faiss.SearchParametersHNSW(efSearch=max(64, 2 * nprobe)))
    return faiss.SearchParametersIVF(nprobe=nprobe)


def available() -> bool:
    """Whether FAISS imports here (the `search` extra): without it queries scan exactly."""
    try:
        _faiss()
    except StoreError:
        return False
    return True


def default_nprobe(lists: int) -> int:
    """Lists probed per query: enough for recall@10 >= 0.95 on clustered speaker data
    (benchmarks/search_scale.py): 1/32 of the lists, at least 16 (32 of 1,024 at 1 M rows:
    recall 0.98; 128 of 4,096 at 10 M: 0.97 in ~22 ms on 2 shared cores)."""
    return max(16, lists // 32)


def folder_of(store: Manifest, model: ModelRecord) -> Path:
    return store.paths.cache / store.model_arrays(model).group_name


def generation(store: Manifest) -> str:
    """Which live items the store holds, cheaply: removed items and the newest item id.
    Changes when a rescan removes (or adds) items; recorded with the index for the
    reader's information only: queries map every row through the manifest anyway."""
    removed, newest = store.conn.execute(
        "SELECT (SELECT count(*) FROM items WHERE removed = 1), (SELECT coalesce(max(id), 0) FROM items)"
    ).fetchone()
    return f"{removed}:{newest}"


def read_meta(folder: Path, model: ModelRecord) -> IndexMeta | None:
    """The published index of the model, or None (none, unreadable, or of another model)."""
    try:
        with open(folder / META_NAME) as f:
            meta = IndexMeta(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    if meta.fingerprint != model.fingerprint or meta.dim != model.dim:
        return None
    return meta


# -- opening (queries) --------------------------------------------------------------------

_LOADED: dict[str, Any] = {}
_LOADED_LOCK = threading.Lock()


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise StoreError("the ANN index needs FAISS: pip install 'embstore[search]'") from None
    return faiss


def open_index(store: Manifest, model: ModelRecord) -> tuple[IndexMeta, Any] | None:
    """(meta, FAISS index) of the model's published index, or None. Kept loaded per
    process (keyed by its file, which is never rewritten), so a second query pays nothing."""
    folder = folder_of(store, model)
    for _ in range(3):
        meta = read_meta(folder, model)
        if meta is None or meta.rows > committed_rows(store.conn, model.id):
            return None  # an index ahead of the store (rows rolled back) answers nothing
        path = str(folder / meta.file)
        with _LOADED_LOCK:
            index = _LOADED.get(path)
        if index is not None:
            if _faiss().extract_index_ivf(index).nprobe != meta.nprobe:
                tune(index, meta.nprobe)  # `embstore index --nprobe` republished the same file
            return meta, index
        try:
            index = _faiss().read_index(path)
        except RuntimeError:
            if os.path.exists(path):
                raise StoreError(f"{path}: unreadable index; delete {folder / META_NAME} and run `embstore index`") from None
            continue  # replaced by a newer build between reading the meta and the file: read it again
        tune(index, meta.nprobe)
        with _LOADED_LOCK:
            for old in [p for p in _LOADED if os.path.dirname(p) == str(folder)]:
                del _LOADED[old]
            _LOADED[path] = index
        return meta, index
    return None


# -- building -----------------------------------------------------------------------------


@dataclass
class IndexReport(Report):
    """What `Store.index` did to the model's index: `action` "built", "extended",
    "unchanged", "busy" (another process was building it) or "flat" (none: the exact
    scan answers); `kind` e.g. "ivf2048,sq8"; `rows` covered; `reason`; `bytes` of the file."""

    model: str
    action: str
    kind: str
    rows: int
    committed: int
    lists: int | None
    nprobe: int | None
    bytes: int
    seconds: float
    reason: str


def build_index(
    store: Manifest, model: str | None = None, kind: str = "auto", rebuild: bool = False, lists: int | None = None,
    nprobe: int | None = None,
) -> IndexReport:
    """`ensure` for a model named by the user, as a report."""
    m = store.resolve_model(model, kind=None)
    result = ensure(store, m, kind=kind, rebuild=rebuild, lists=lists, nprobe=nprobe)
    meta = result.meta
    size = os.path.getsize(folder_of(store, m) / meta.file) if meta is not None else 0
    return IndexReport(
        store.model_key(m), result.action, meta.kind if meta else "flat", meta.rows if meta else 0,
        committed_rows(store.conn, m.id), meta.lists if meta else None, meta.nprobe if meta else None, size,
        round(result.seconds, 3), result.reason,
    )


@dataclass
class BuildResult:
    """What `ensure` did: "built", "extended", "unchanged", or "flat" (no index needed)."""

    action: str
    meta: IndexMeta | None
    seconds: float
    reason: str


def ensure(
    store: Manifest, model: ModelRecord, kind: str = "auto", rebuild: bool = False, lists: int | None = None,
    nprobe: int | None = None, progress: Callable[[int, int], None] | None = None, wait: bool = True,
    retrain: bool = True,
) -> BuildResult:
    """Bring the model's index up to date with its committed rows: build it, extend it
    with the rows added since, or retrain it when it drifted past the bound (or `rebuild`).
    kind "auto": an IVF index from `IVF_MIN_ROWS` rows on, none below; "ivf": always.
    Whether the new rows would drift past the bound is estimated before they are added.
    `wait` False: "busy" at once when another process holds the index's lock (a query
    then uses what is published); `retrain` False: extended even past the bound (a query
    never pays for a retraining; `embstore index` does)."""
    if kind not in KINDS:
        raise StoreError(f"index kind must be one of {', '.join(KINDS)} (got {kind!r})")
    if lists is not None and lists < 1:
        raise StoreError(f"lists must be at least 1 (got {lists})")
    if nprobe is not None and nprobe < 1:
        raise StoreError(f"nprobe must be at least 1 (got {nprobe})")
    started = time.perf_counter()
    committed = committed_rows(store.conn, model.id)
    small = kind == "auto" and committed < IVF_MIN_ROWS and read_meta(folder_of(store, model), model) is None
    if kind == "flat" or small:
        why = "asked for" if kind == "flat" else f"{committed} rows < {IVF_MIN_ROWS}: the exact scan is as fast"
        unit_rows(store.model_arrays(model), committed, model.fingerprint, store.paths.cache)  # the rows it scans
        if kind == "flat":
            drop(store, model)
        return BuildResult("flat", None, time.perf_counter() - started, why)
    if committed == 0:
        raise StoreError(f"{store.model_key(model)} has no embeddings yet; run `embstore extract`")
    folder = folder_of(store, model)
    source = unit_rows(store.model_arrays(model), committed, model.fingerprint, store.paths.cache)
    if source.matrix is None:
        raise StoreError(f"cannot write {store.paths.cache}: the index needs a writable store")
    with _locked(folder / LOCK_NAME, wait) as held:
        if not held:
            return BuildResult("busy", read_meta(folder, model), time.perf_counter() - started, "another process builds it")
        latest = committed_rows(store.conn, model.id)
        if latest != committed:  # rows came while we waited for the lock (and maybe into the index)
            committed = latest
            source = unit_rows(store.model_arrays(model), committed, model.fingerprint, store.paths.cache)
        meta = read_meta(folder, model)
        drift = None
        # an index over more rows than the store commits (rows rolled back, the store
        # rebuilt) holds rows that are not the store's: never kept, always rebuilt
        ahead = meta is not None and meta.rows > committed
        if meta is not None and not rebuild and not ahead and (lists is None or lists == meta.lists):
            if nprobe is not None and nprobe != meta.nprobe:
                meta.nprobe = nprobe
                _publish_meta(folder, meta)
            if meta.rows >= committed:
                return BuildResult("unchanged", meta, time.perf_counter() - started, "up to date")
            index = _faiss().read_index(str(folder / meta.file))
            drift = _projected(index, meta, source, committed).drifted()
            if drift is None or not retrain:
                new = _extend(index, meta, source, committed, generation(store), progress)
                _publish(folder, index, new)
                why = f"{committed - meta.rows} rows added" + (f" (past the drift bound: {drift})" if drift else "")
                return BuildResult("extended", new, time.perf_counter() - started, why)
        if ahead and meta is not None:
            reason = f"the index covers {meta.rows} rows, the store commits {committed}"
        elif rebuild or drift or meta is None:
            reason = "rebuild asked for" if rebuild else (f"drifted: {drift}" if drift else "no index yet")
        else:
            reason = f"{lists} lists asked for (the index has {meta.lists})"
        index, new = _train(source, committed, model, lists or lists_for(committed), generation(store))
        new.nprobe = nprobe or default_nprobe(new.lists)
        new = _extend(index, new, source, committed, new.generation, progress, first=True)
        _publish(folder, index, new)
        return BuildResult("built", new, time.perf_counter() - started, reason)


@contextlib.contextmanager
def _locked(path: Path, wait: bool) -> Iterator[bool]:
    """The index's lock between processes (`paths.file_lock`, which `drop` takes too):
    True when held; False at once when `wait` is False and another process holds it."""
    if wait:
        with file_lock(path):
            yield True
        return
    # a query never waits for a build: the one thing `file_lock` (always waiting) lacks
    import fcntl

    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _projected(index: Any, meta: IndexMeta, source: UnitRows, committed: int) -> IndexMeta:
    """The meta the index would have with rows [meta.rows, committed) added (their
    residual estimated on every 16th row): whether adding them drifts past the bound."""
    faiss = _faiss()
    sample = np.ascontiguousarray(source.matrix[meta.rows : committed : 16], dtype=np.float32)
    best, _ = faiss.extract_index_ivf(index).quantizer.search(sample, 1)
    old = meta.added_rows / 16
    residual = (meta.added_residual * old + float(np.sum(1.0 - best[:, 0]))) / max(old + len(best), 1)
    return IndexMeta(**dict(asdict(meta), added_rows=meta.added_rows + committed - meta.rows, added_residual=residual))


def _train(source: UnitRows, committed: int, model: ModelRecord, lists: int, gen: str) -> tuple[Any, IndexMeta]:
    """An empty IVF-SQ8 index trained on a sample of the rows, and its meta."""
    faiss = _faiss()
    lists = max(1, min(lists, committed // 4))  # k-means needs points per list
    n_train = min(committed, max(TRAIN_PER_LIST * lists, 10_000), MAX_TRAIN)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(committed, size=n_train, replace=False))
    x = np.ascontiguousarray(source.take(sample))
    # from HNSW_QUANTIZER_LISTS lists on, rows find their list through an HNSW graph of the
    # centroids (~20 us a row) instead of against every centroid (16 k x dim flops a row)
    coarse = f"IVF{lists}_HNSW32" if lists >= HNSW_QUANTIZER_LISTS else f"IVF{lists}"
    index = faiss.index_factory(source.dim, f"{coarse},SQ8", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = KMEANS_ITERATIONS
    ivf.cp.spherical = True
    ivf.cp.max_points_per_centroid = 10**9  # the sample is already the size we want
    index.train(x)
    tune(index, default_nprobe(lists))
    best, _ = ivf.quantizer.search(x[:: max(1, len(x) // 20_000)], 1)
    meta = IndexMeta(
        kind=f"ivf{lists}{'_hnsw' if lists >= HNSW_QUANTIZER_LISTS else ''},sq8", file="", rows=0, trained_rows=committed, lists=lists, nprobe=default_nprobe(lists),
        dim=source.dim, fingerprint=model.fingerprint, generation=gen,
        train_residual=float(np.mean(1.0 - best[:, 0])), added_rows=0, added_residual=0.0, built_at=utcnow(),
    )
    return index, meta


def _extend(
    index: Any, meta: IndexMeta, source: UnitRows, committed: int, gen: str,
    progress: Callable[[int, int], None] | None, first: bool = False,
) -> IndexMeta:
    """Add rows [meta.rows, committed) to the index; the meta of the result (the mean
    residual of added rows estimated on every 16th row)."""
    faiss = _faiss()
    residual_sum, residual_n = 0.0, 0
    start = meta.rows
    tune(index, meta.nprobe, ADD_EF_SEARCH)
    for lo in range(start, committed, BLOCK_ROWS):
        hi = min(lo + BLOCK_ROWS, committed)
        block = np.ascontiguousarray(source.matrix[lo:hi], dtype=np.float32)
        index.add_with_ids(block, np.arange(lo, hi, dtype=np.int64))
        if not first:
            best, _ = faiss.extract_index_ivf(index).quantizer.search(block[::16], 1)
            residual_sum += float(np.sum(1.0 - best[:, 0]))
            residual_n += len(best)
        if progress is not None:
            progress(hi - start, committed - start)
    tune(index, meta.nprobe)
    added = 0 if first else meta.added_rows + (committed - start)
    old_samples = meta.added_rows / 16  # the earlier mean's sample, weighed by its rows
    mean = (meta.added_residual * old_samples + residual_sum) / max(old_samples + residual_n, 1) if added else 0.0
    return IndexMeta(**dict(asdict(meta), rows=committed, generation=gen, added_rows=added, added_residual=mean,
                            built_at=utcnow()))


def drop(store: Manifest, model: ModelRecord) -> bool:
    """Unpublish the model's index (queries scan exactly again); True if there was one."""
    folder = folder_of(store, model)
    if not (folder / META_NAME).exists():
        return False
    with file_lock(folder / LOCK_NAME):
        try:
            os.unlink(folder / META_NAME)
        except FileNotFoundError:
            return False
        for path in folder.glob("ivf-*"):
            path.unlink(missing_ok=True)
    return True


def _publish(folder: Path, index: Any, meta: IndexMeta) -> None:
    """Write the index to a new file, fsync it, point `index.json` at it, then delete
    the files no meta names (older builds, temporary files of killed ones)."""
    faiss = _faiss()
    name = f"ivf-{secrets.token_hex(6)}.faiss"
    tmp = folder / f"{name}.tmp"
    faiss.write_index(index, str(tmp))
    _fsync(tmp)
    os.replace(tmp, folder / name)
    meta.file = name
    _publish_meta(folder, meta)
    for path in folder.iterdir():
        stale = path.name.startswith("ivf-") and path.name != name
        if stale:
            try:
                path.unlink()
            except OSError:
                pass


def _publish_meta(folder: Path, meta: IndexMeta) -> None:
    """Replace `index.json` whole (`paths.write_atomic_text`: a reader sees the old or the
    new one), its bytes on disk before the rename: a power cut leaves the old index or the
    new one, never an empty file (which would read as no index and cost a full rebuild)."""
    write_atomic_text(folder / META_NAME, json.dumps(asdict(meta), indent=1), durable=True)
    _fsync_dir(folder)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
