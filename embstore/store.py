"""The front door: `embstore.open(path)` gives a `Store`.

A `Store` is the store's `Manifest` (SQLite + its arrays) with every capability of the
library as a method that delegates downward: scanning, extraction, status, queries,
scoring, exports, verification. Nothing in the library imports this module.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from embstore.errors import StoreError
from embstore.manifest import reports
from embstore.manifest.database import Manifest

if TYPE_CHECKING:
    from embstore.export.pkl import ExportReport
    from embstore.extract.summary import ExtractSummary
    from embstore.scan.sync import ScanReport
    from embstore.verify import VerifyReport

# Each capability's module is imported by the method that uses it: a command pays for
# its own imports only (`embstore extract` starts ~0.3 s sooner than with all of them).


class Store(Manifest):
    """Open with `embstore.open(path)`; creates or upgrades the store as needed."""

    # -- scanning and extraction ---------------------------------------------------------

    def scan(self, roots: Sequence[str | os.PathLike] = (), **options: Any) -> ScanReport:
        """Add or refresh files; see `embstore.scan.sync.scan_into` for the options."""
        from embstore.scan.sync import scan_into

        return scan_into(self, roots, **options)

    def extract(self, **options: Any) -> ExtractSummary:
        """Embed every pending item; the options are `ExtractOptions`' fields (`ray=`
        runs on a Ray cluster: see docs/ray.md)."""
        from embstore.extract.options import ExtractOptions
        from embstore.extract.supervisor import run_extraction

        opts = ExtractOptions.from_kwargs(**options)
        if opts.ray is not None:
            from embstore.extract.ray.driver import run_ray_extraction

            return run_ray_extraction(self, opts)
        return run_extraction(self, opts)

    # -- reports ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Files, items, speakers, audio and each model's progress."""
        return reports.status(self.conn, str(self.path))

    def errors(self, model: str | None = None) -> list[dict[str, Any]]:
        """Failed items (per model) and files whose header could not be read."""
        models = [self.resolve_model(model, kind=None)] if model or len(self.models()) == 1 else self.models()
        return reports.errors(self.conn, models)

    def verify(self, model: str | None = None, deep: int = 0, seed: int | None = None) -> VerifyReport:
        """Check that the manifest and the arrays agree; see `embstore.verify`."""
        from embstore.verify import verify_store

        return verify_store(self, model=model, deep=deep, seed=seed)

    # -- reading ------------------------------------------------------------------------

    def embeddings(
        self,
        model: str | None = None,
        speaker: str | None = None,
        dataset: str | None = None,
    ) -> tuple[list[str], np.ndarray]:
        """(item ids, float32 [n, dim] vectors in the same order) of finished items."""
        m, rows = self.done_rows(model, speaker, dataset)
        vectors = self.model_arrays(m).read_rows(np.array([r["row"] for r in rows], dtype=np.int64))
        return [r["uid"] for r in rows], vectors

    def speakers(self, model: str | None = None, by: str = "speaker") -> list[dict[str, Any]]:
        """Speakers with their datasets, live items and done items; by="cluster": the
        pseudo-speakers of `cluster` (`<dataset>/<label>`)."""
        from embstore import query

        return query.speakers(self, model, by)

    def speaker_items(self, speaker: str, model: str | None = None, vectors: bool = False) -> list[dict[str, Any]]:
        """One speaker's items (with embeddings when `vectors`)."""
        from embstore import query

        return query.speaker_items(self, speaker, model, vectors)

    def similar(
        self,
        item_id: str | None = None,
        audio: str | os.PathLike | None = None,
        k: int = 10,
        model: str | None = None,
        vector: np.ndarray | None = None,
    ) -> list[dict[str, Any]]:
        """Cosine nearest neighbours [{id, speaker, dataset, path, score}]; of a window
        model (by audio or vector), windows, with their `start`, `end` and index."""
        from embstore import query

        return query.similar(self, item_id=item_id, audio=audio, k=k, model=model, vector=vector)

    def windows(self, item_id: str, model: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(starts, ends, float32 [n, dim] rows) of one item's windows, from a window model
        (`extract(windows="1.5:0.75")`), in time order; seconds from the item's start."""
        from embstore import query

        return query.windows(self, item_id, model)

    def diarize(self, model: str | None = None, num_speakers: int | None = None, max_speakers: int | None = None,
                method: str = "spectral", windows: str = "1.5:0.75", vad: str | None = None,
                extract: dict[str, Any] | None = None, rttm: bool = False) -> dict[str, Any]:
        """Who spoke when in every item: window embeddings are extracted first where they
        are missing (resumable, like `extract`; `extract` takes its other options), then
        each item's windows are clustered. Returns the report with `segments` per item,
        `failed` (items whose windows could not be clustered), `extraction` (the extract
        summary) and `outcome` (done, failed and left over every item: the exit status).
        `rttm`: the segments go to an RTTM file, so an item id it cannot hold is an error
        before any work."""
        from embstore.diarize import stored as diarization
        from embstore.segments.policy import cutting_of_model

        diarization.check_options(method, num_speakers, max_speakers)
        if rttm:
            diarization.check_rttm_ids(self)
        if model is not None:
            m = self.resolve_model(model, kind="windows")
            cutting = cutting_of_model(m.frontend)
            if cutting is None or cutting.spec is None:
                raise StoreError(f"{self.model_key(m)} records no window settings; extract it again")
            run = dict(model=m.spec, windows=str(cutting.spec), vad=cutting.vad.method, dtype=m.compute_dtype)
        else:
            run = dict(windows=windows, vad=vad)
        summary = self.extract(**{**(extract or {}), **run})
        report = diarization.diarize_store(self, summary.model, num_speakers, max_speakers, method)
        report["extraction"] = summary.as_dict()
        # items whose windows could not be clustered failed too, though their windows are done
        outcome = summary.outcome
        failed = len(report["failed"])
        outcome.done -= failed
        outcome.failed += failed
        if failed and outcome.reason is None:
            outcome.reason = "clustering: " + next(iter(report["failed"].values()))
        report["outcome"] = outcome
        return report

    def cluster(self, dataset: str, model: str | None = None, threshold: float | None = None,
                num_speakers: int | None = None) -> dict[str, Any]:
        """Pseudo-speaker labels (`items.cluster`) for the embedded items of an unlabelled
        dataset: average-linkage clustering (staged, in bounded memory, for large ones)."""
        from embstore.clustering import stored as clustering

        return clustering.cluster_dataset(self, dataset, model, threshold, num_speakers)

    def centroids(self, model: str | None = None, by: str = "speaker") -> tuple[list[str], np.ndarray]:
        """(speakers, float32 [n, dim] mean L2-normalised embedding per speaker); by="cluster":
        per pseudo-speaker."""
        from embstore import query

        return query.centroids(self, model, by)

    def score(self, trials: str | os.PathLike | Sequence[str | os.PathLike], model: str | None = None,
              **options: Any) -> dict[str, Any]:
        """EER, minDCF, actual DCF of trial lists under none/mean/S-norm/AS-norm; score files
        and plots. See `embstore.eval.scoring.score` for the options."""
        from embstore.eval import scoring

        return scoring.score(self, trials, model=model, **options)

    def outliers(self, model: str | None = None, **options: Any) -> list[dict[str, Any]]:
        """Items furthest from their own speaker; see `embstore.eval.outliers.find_outliers`."""
        from embstore.eval import outliers

        return outliers.find_outliers(self, model=model, **options)

    def report(self, out: str | os.PathLike, **options: Any) -> dict[str, Any]:
        """Write the self-contained HTML report; see `embstore.eval.report.build_report`."""
        from embstore.eval import report

        return report.build_report(self, out, **options)

    # -- exports ------------------------------------------------------------------------

    def export_pkl(self, out: str | os.PathLike, **options: Any) -> ExportReport:
        """One pickle per item under OUT; see `embstore.export.pkl.export_pkl`."""
        from embstore.export import pkl

        return pkl.export_pkl(self, out, **options)

    def export_kaldi(self, out: str | os.PathLike, model: str | None = None, by: str = "speaker") -> dict[str, Any]:
        from embstore.export import kaldi

        return kaldi.export_kaldi(self, out, model, by)

    def export_npy(self, out: str | os.PathLike, model: str | None = None, by: str = "speaker") -> dict[str, Any]:
        from embstore.export import npy

        return npy.export_npy(self, out, model, by)

    def __enter__(self) -> "Store":
        return self


__all__ = ["Store"]
