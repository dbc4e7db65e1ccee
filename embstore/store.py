"""The front door: `embstore.open(path)` gives a `Store`.

A `Store` holds the store's `Manifest` (`store.manifest`: SQLite, the model registry and
the arrays; the plumbing the library works on) and offers every capability of the
library as a method that delegates downward: scanning, extraction, status, queries,
scoring, exports, verification. Nothing in the library imports this module.

The API's rules: positional arguments are what a method works on (roots, trial lists,
an output folder, an item id); everything else is keyword-only. Methods with many
options take them as `**options`, checked by their option object (`ExtractOptions`,
`ScanOptions`, `ScoreOptions`, `ReportOptions`, `ExportOptions`, `OutlierOptions`), so a
misspelled name is a one-line `StoreError`. The results of operations and analyses are
`embstore.api.Report`s (`as_dict()` is their JSON, `as_json()` their `--json`); the
reading methods return plain data (ids, vectors, rows of dicts). Where a library
function returns a dict, its method wraps it in its report here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from embstore.api import (
    ClusterReport, DiarizeReport, ErrorsReport, Failure, Outlier, OutliersReport, ScoreReport, StatusReport,
    options_from,
)
from embstore.errors import StoreError
from embstore.manifest import reports
from embstore.manifest.database import Manifest

if TYPE_CHECKING:
    from embstore.eval.report import HtmlReport
    from embstore.export.files import MatrixExport
    from embstore.export.parquet import ParquetExport
    from embstore.export.pkl import ExportReport
    from embstore.extract.summary import ExtractSummary
    from embstore.manifest.registry import ModelRecord
    from embstore.scan.sync import ScanReport
    from embstore.search.index import IndexReport
    from embstore.search.duplicates import DuplicatesReport
    from embstore.search.overlap import OverlapReport
    from embstore.verify import VerifyReport

# Each capability's module is imported by the method that uses it: a command pays for
# its own imports only (`embstore extract` starts ~0.3 s sooner than with all of them).


class Store(contextlib.AbstractContextManager):
    """Open with `embstore.open(path)`; creates (`create`) or upgrades the store as needed."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.manifest = Manifest(path, create=create)

    @property
    def path(self) -> Path:
        return self.manifest.path

    @property
    def db(self) -> Any:
        """The manifest as a `sqlite_utils.Database`, for ad-hoc inspection."""
        return self.manifest.db

    def models(self) -> list[ModelRecord]:
        """The store's models, oldest first."""
        return self.manifest.models()

    def close(self) -> None:
        self.manifest.close()

    def __exit__(self, *exc: object) -> None:  # `with embstore.open(...) as store:` closes it
        self.close()

    # -- scanning and extraction ---------------------------------------------------------

    def scan(self, roots: Sequence[str | os.PathLike] = (), **options: Any) -> ScanReport:
        """Add or refresh files; `options`: `embstore.scan.sync.ScanOptions`' fields
        (layout, kaldi, lists, lhotse, hf, dataset, id_column, speaker_column, jobs,
        progress)."""
        from embstore.scan.sync import ScanOptions, scan_into

        return scan_into(self.manifest, roots, options_from(ScanOptions, "scan", options))

    def extract(self, **options: Any) -> ExtractSummary:
        """Embed every pending item; `options`: `ExtractOptions`' fields (`ray=` runs on a
        Ray cluster: see docs/ray.md)."""
        from embstore.extract.options import ExtractOptions
        from embstore.extract.supervisor import run_extraction

        opts = ExtractOptions.from_kwargs(**options)
        if opts.ray is not None:
            from embstore.extract.ray.driver import run_ray_extraction

            return run_ray_extraction(self.manifest, opts)
        return run_extraction(self.manifest, opts)

    # -- reports ------------------------------------------------------------------------

    def status(self) -> StatusReport:
        """Files, items, speakers, audio and each model's progress."""
        return StatusReport(**reports.status(self.manifest.conn, str(self.path)))

    def errors(self, *, model: str | None = None) -> ErrorsReport:
        """Failed items (per model) and files whose header could not be read."""
        known = self.manifest.models()
        models = [self.manifest.resolve_model(model, kind=None)] if model or len(known) == 1 else known
        return ErrorsReport([Failure(**row) for row in reports.errors(self.manifest.conn, models)])

    def verify(self, *, model: str | None = None, deep: int = 0, seed: int | None = None) -> VerifyReport:
        """Check that the manifest and the arrays agree; see `embstore.verify`."""
        from embstore.verify import verify_store

        return verify_store(self.manifest, model=model, deep=deep, seed=seed)

    # -- reading ------------------------------------------------------------------------

    def embeddings(
        self, *, model: str | None = None, speaker: str | None = None, dataset: str | None = None,
    ) -> tuple[list[str], np.ndarray]:
        """(item ids, float32 [n, dim] vectors in the same order) of finished items."""
        m, rows = self.manifest.done_rows(model, speaker, dataset)
        vectors = self.manifest.model_arrays(m).read_rows(np.array([r["row"] for r in rows], dtype=np.int64))
        return [r["uid"] for r in rows], vectors

    def speakers(self, *, model: str | None = None, by: str = "speaker") -> list[dict[str, Any]]:
        """Speakers with their datasets, live items and done items; by="cluster": the
        pseudo-speakers of `cluster` (`<dataset>/<label>`)."""
        from embstore import query

        return query.speakers(self.manifest, model, by)

    def speaker_items(self, speaker: str, *, model: str | None = None, vectors: bool = False) -> list[dict[str, Any]]:
        """One speaker's items (with embeddings when `vectors`)."""
        from embstore import query

        return query.speaker_items(self.manifest, speaker, model, vectors)

    def similar(
        self,
        item_id: str | None = None,
        *,
        audio: str | os.PathLike | None = None,
        vector: np.ndarray | None = None,
        k: int = 10,
        model: str | None = None,
        exact: bool = False,
        min_score: float | None = None,
        offset: int = 0,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Cosine nearest neighbours [{id, speaker, dataset, path, score, index, exact}] of
        an item, an audio file or a vector; of a window model (by audio or vector), windows,
        with their `start`, `end` and index. Through the model's ANN index when it has one
        (candidates re-ranked exactly); `exact`: the full scan. `min_score`: every item at
        or above that cosine, one page of `limit` (default 1000) from `offset`."""
        from embstore import query

        return query.similar(self.manifest, item_id=item_id, audio=audio, k=k, model=model, vector=vector,
                             exact=exact, min_score=min_score, offset=offset, limit=limit)

    def index(self, *, model: str | None = None, kind: str = "auto", rebuild: bool = False,
              lists: int | None = None, nprobe: int | None = None) -> IndexReport:
        """Build the model's ANN index in STORE/cache, or bring it up to date (new rows
        added; retrained past the drift bound or with `rebuild`); kind "auto" (IVF from
        200,000 rows, the exact scan below), "ivf" or "flat" (none: queries scan)."""
        from embstore.search import index

        return index.build_index(self.manifest, model=model, kind=kind, rebuild=rebuild, lists=lists, nprobe=nprobe)

    def overlap(self, *, source: str, target: str, threshold: float = 0.7, model: str | None = None,
                items: bool = False) -> OverlapReport:
        """Speakers of dataset `source` whose centroid (`items`: any of whose items) is
        within cosine `threshold` of a speaker centroid of dataset `target`."""
        from embstore.search import overlap

        return overlap.overlap(self.manifest, source, target, threshold=threshold, model=model, items=items)

    def near_duplicates(self, *, min_score: float = 0.98, model: str | None = None,
                        limit: int = 1000) -> DuplicatesReport:
        """Pairs of items whose embeddings score at least `min_score` (re-encoded or
        trimmed copies the byte hash misses), best first, at most `limit`."""
        from embstore.search import duplicates

        return duplicates.near_duplicates(self.manifest, min_score=min_score, model=model, limit=limit)

    def windows(self, item_id: str, *, model: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(starts, ends, float32 [n, dim] rows) of one item's windows, from a window model
        (`extract(windows="1.5:0.75")`), in time order; seconds from the item's start."""
        from embstore import query

        return query.windows(self.manifest, item_id, model)

    def centroids(self, *, model: str | None = None, by: str = "speaker") -> tuple[list[str], np.ndarray]:
        """(speakers, float32 [n, dim] mean L2-normalised embedding per speaker); by="cluster":
        per pseudo-speaker."""
        from embstore import query

        return query.centroids(self.manifest, model, by)

    # -- through time -------------------------------------------------------------------

    def diarize(self, *, model: str | None = None, embedder: str | None = None, num_speakers: int | None = None,
                max_speakers: int | None = None, method: str = "spectral", windows: str = "1.5:0.75",
                vad: str | None = None, rttm: bool = False, **extract_options: Any) -> DiarizeReport:
        """Who spoke when in every item: window embeddings are extracted first where they
        are missing (resumable, like `extract`; `extract_options` are its other options,
        e.g. workers=, device=), then each item's windows are clustered. `model`: a window
        model the store holds (its windows and VAD are reused); otherwise `embedder` (a
        model spec; the default model when None) with `windows` and `vad`. Returns a
        `DiarizeReport`: `segments` per item, `failed` (items whose windows could not be
        clustered), `extraction` (the extract summary) and `outcome` (done, failed and left
        over every item: the exit status). `rttm`: the segments go to an RTTM file, so an
        item id it cannot hold is an error before any work."""
        from embstore.diarize import stored as diarization
        from embstore.segments.policy import cutting_of_model

        diarization.check_options(method, num_speakers, max_speakers)
        if rttm:
            diarization.check_rttm_ids(self.manifest)
        if model is not None and embedder is not None:
            raise StoreError("give model (a window model in the store) or embedder (a spec to extract with), not both")
        if model is not None:
            m = self.manifest.resolve_model(model, kind="windows")
            cutting = cutting_of_model(m.frontend)
            if cutting is None or cutting.spec is None:
                raise StoreError(f"{self.manifest.model_key(m)} records no window settings; extract it again")
            run = dict(model=m.spec, windows=str(cutting.spec), vad=cutting.vad.method, dtype=m.compute_dtype)
        else:
            run = dict(model=embedder, windows=windows, vad=vad)
        summary = self.extract(**{**extract_options, **run})
        found = diarization.diarize_store(self.manifest, summary.model, num_speakers, max_speakers, method)
        # items whose windows could not be clustered failed too, though their windows are
        # done; a copy, so the extraction's own outcome still says what it did
        outcome = dataclasses.replace(summary.outcome)
        failed = len(found["failed"])
        outcome.done -= failed
        outcome.failed += failed
        if failed and outcome.reason is None:
            outcome.reason = "clustering: " + next(iter(found["failed"].values()))
        return DiarizeReport(**found, extraction=summary, outcome=outcome)

    def cluster(self, dataset: str, *, model: str | None = None, threshold: float | None = None,
                num_speakers: int | None = None) -> ClusterReport:
        """Pseudo-speaker labels (`items.cluster`) for the embedded items of an unlabelled
        dataset: average-linkage clustering (staged, in bounded memory, for large ones)."""
        from embstore.clustering import stored as clustering

        return ClusterReport(**clustering.cluster_dataset(self.manifest, dataset, model, threshold, num_speakers))

    # -- evaluation ---------------------------------------------------------------------

    def score(self, trials: str | os.PathLike | Sequence[str | os.PathLike], *, model: str | None = None,
              scores: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
              **options: Any) -> ScoreReport:
        """EER, minDCF, actual DCF of trial lists under none/mean/S-norm/AS-norm; score files
        (`scores`) and plots (`plot`). `options`: `ScoreOptions`' fields (norm, mean_from,
        cohort, top_n, p_target, c_miss, c_fa)."""
        from embstore.eval import scoring

        opts = options_from(scoring.ScoreOptions, "score", options)
        return ScoreReport(**scoring.score(self.manifest, trials, model=model, scores=scores, plot=plot, options=opts))

    def outliers(self, **options: Any) -> OutliersReport:
        """Items furthest from their own speaker, worst first; `options`: `OutlierOptions`'
        fields (model, dataset, speaker, top, below)."""
        from embstore.eval import outliers

        found = outliers.find_outliers(self.manifest, options_from(outliers.OutlierOptions, "outliers", options))
        return OutliersReport([Outlier(**row) for row in found])

    def report(self, out: str | os.PathLike, **options: Any) -> HtmlReport:
        """Write the self-contained HTML report; `options`: `ReportOptions`' fields
        (trials, model, outliers) and `ScoreOptions`' (for the scoring sections)."""
        from embstore.eval import report, scoring

        own = {name: options.pop(name) for name in report.REPORT_OPTIONS if name in options}
        scoring_options = options_from(scoring.ScoreOptions, "report", options)
        return report.build_report(self.manifest, out, report.ReportOptions(**own, scoring=scoring_options))

    # -- exports ------------------------------------------------------------------------

    def export_pkl(self, out: str | os.PathLike, **options: Any) -> ExportReport:
        """One pickle per item under OUT; `options`: `ExportOptions`' fields (model,
        dataset, speaker, fmt, threads, force, by, progress)."""
        from embstore.export import pkl

        return pkl.export_pkl(self.manifest, out, options_from(pkl.ExportOptions, "export", options))

    def export_kaldi(self, out: str | os.PathLike, *, model: str | None = None, by: str = "speaker",
                     matrix: bool = False) -> MatrixExport:
        """Kaldi tables (xvector.ark/scp, utt2spk, spk2utt) in OUT; `matrix`: 1 x dim
        matrices (for Lhotse's Kaldi reader) instead of vectors."""
        from embstore.export import kaldi

        return kaldi.export_kaldi(self.manifest, out, model, by, matrix)

    def export_lhotse(self, out: str | os.PathLike, *, model: str | None = None) -> MatrixExport:
        """OUT/cuts.jsonl.gz, one Lhotse cut per embedded item (per window of a window
        model) with the custom field `embedding`, stored in OUT/embeddings-<random>.h5
        (a new file each export: the cuts are swapped in atomically)."""
        from embstore.export import lhotse

        return lhotse.export_lhotse(self.manifest, out, model)

    def export_parquet(self, out: str | os.PathLike, *, model: str | None = None, force: bool = False) -> ParquetExport:
        """Parquet shards OUT/part-NNNNN.parquet (id, speaker, dataset, path, start, end,
        embedding, ...), incremental; `force`: rewrite every shard."""
        from embstore.export import parquet

        return parquet.export_parquet(self.manifest, out, model, force)

    def export_npy(self, out: str | os.PathLike, *, model: str | None = None, by: str = "speaker") -> MatrixExport:
        """One float32 matrix (OUT/embeddings.npy) and its row labels."""
        from embstore.export import npy

        return npy.export_npy(self.manifest, out, model, by)


__all__ = ["Store"]
