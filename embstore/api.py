"""What the Python API is made of: option objects and reports.

- An operation's options are a dataclass whose fields are their real names and types,
  checked when it is made (`ExtractOptions`, `ScanOptions`, `ScoreOptions`,
  `ReportOptions`, `ExportOptions`, `OutlierOptions`). `options_from` builds one from
  keyword arguments, so a misspelled name is a one-line `StoreError` naming the known
  ones, never a `TypeError` traceback from deep inside.
- Every result a `Store` method returns is a `Report`: a dataclass whose `as_dict()` is
  its JSON form and `as_json()` what `--json` prints (the same, except for the reports
  whose `--json` has been a list since 0.1: `ErrorsReport`, `ScoreReport`,
  `OutliersReport`). The reports of the analyses whose library functions return dicts
  live here (`StatusReport`, `ErrorsReport`, `ScoreReport`, `DiarizeReport`,
  `ClusterReport`, `OutliersReport`); the others beside the code that makes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from embstore.errors import StoreError
from embstore.outcome import Outcome

if TYPE_CHECKING:  # annotations only: the api layer sits below everything that makes these
    from embstore.diarize.rttm import Segment
    from embstore.extract.summary import ExtractSummary

T = TypeVar("T")


def options_from(cls: type[T], what: str, kwargs: dict[str, Any], error: type[StoreError] = StoreError) -> T:
    """`cls(**kwargs)`, where an unknown name is a one-line `error` listing the known ones
    (the value checks are `cls`'s own, in its `__post_init__`)."""
    known = [f.name for f in fields(cls) if f.init]  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise error(f"unknown {what} option(s): {', '.join(unknown)} (known: {', '.join(known)})")
    return cls(**kwargs)


def plain(value: Any) -> Any:
    """`value` as JSON-ready data: reports and outcomes by their `as_dict()`, other
    dataclasses (a report's typed rows) field by field."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class Report:
    """The base of every result a `Store` method returns: a dataclass; `as_dict()` is its
    JSON form, `as_json()` what `--json` prints. Subclasses with derived figures extend
    `as_dict`."""

    def as_dict(self) -> dict[str, Any]:
        if not is_dataclass(self):
            raise TypeError(f"{type(self).__name__} is a Report but not a dataclass")
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    def as_json(self) -> Any:
        """What `embstore <command> --json` prints: `as_dict()` unless a report's command
        has printed something else since 0.1 (a list), which scripts read."""
        return self.as_dict()


def _without_none(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """`d` less those of `keys` whose value is None: keys a run has no value for are left
    out of the JSON, as the 0.1 dicts did."""
    return {k: v for k, v in d.items() if not (k in keys and v is None)}


# -- status and errors --------------------------------------------------------------------


@dataclass
class StatusReport(Report):
    """What a store holds (`Store.status`): live files, items, speakers, datasets and hours
    of audio; unreadable (`scan_failed`) and removed files; `models`: per model key its
    task counts by state (pending, claimed, done, failed, stale), batching, dim,
    fingerprint, rows, kind, `failures_by_reason`, `diarized` (window models) and
    `last_run` (when it ran); `scan_failures_by_reason`: {reason: files}."""

    store: str
    files: int
    items: int
    speakers: int
    datasets: int
    audio_seconds: float
    scan_failed: int
    removed_files: int
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    scan_failures_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class Failure:
    """One failed item of a model (`stage` where it failed: extract, decode, ...) or, with
    `stage` "scan" and no `id` or `model`, a file whose header could not be read."""

    id: str | None
    path: str
    stage: str
    error: str | None
    attempts: int
    model: str | None


class _RowsReport(Report):
    """A report whose `--json` has always been a bare list: its `ROWS` field's rows."""

    ROWS: ClassVar[str]

    def as_json(self) -> list[dict[str, Any]]:
        return [plain(row) for row in getattr(self, self.ROWS)]


@dataclass
class ErrorsReport(_RowsReport):
    """What went wrong (`Store.errors`): failed items per model, then unreadable files.
    `--json` prints the list of failures."""

    ROWS: ClassVar[str] = "failures"
    failures: list[Failure] = field(default_factory=list)


# -- evaluation ---------------------------------------------------------------------------


@dataclass
class ScoreReport(Report):
    """Trial lists scored (`Store.score`): `results`, one row per list and norm (list,
    path, norm, trials, targets, nontargets, missing, missing_ids, eer, eer_threshold,
    min_dcf {p: v}, act_dcf {p: v}, ...); `options` as used (with `p_targets`); the
    `score_files` and `plots` written; `outcome` over the trial ids (the exit status).
    `--json` prints the rows, each with its `model`."""

    model: str
    results: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    score_files: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    outcome: Outcome = field(default_factory=Outcome)

    def as_json(self) -> list[dict[str, Any]]:
        return [dict(plain(row), model=self.model) for row in self.results]


@dataclass
class Outlier:
    """An item far from its own speaker: `score` is its cosine to the speaker's
    leave-one-out centroid, `items` that speaker's item count; the nearest other speaker
    and its cosine; `margin` = score - nearest_score (negative: closer to the other)."""

    id: str
    speaker: str | None
    dataset: str | None
    score: float
    items: int
    nearest_speaker: str | None
    nearest_score: float | None
    margin: float | None


@dataclass
class OutliersReport(_RowsReport):
    """Items by how far they sit from their own speaker, worst first (`Store.outliers`).
    `--json` prints the list of outliers."""

    ROWS: ClassVar[str] = "outliers"
    outliers: list[Outlier] = field(default_factory=list)


# -- through time -------------------------------------------------------------------------


@dataclass
class DiarizeReport(Report):
    """Who spoke when (`Store.diarize`): `items` diarized with window `model` (`computed`
    now, `reused` from the store), `speakers` per item, `segments` per item (`Segment`s:
    start, end, speaker; JSON: [start, end, speaker]), `failed` {item: why its windows
    could not be clustered}, `speech_seconds`; `extraction`: the window extraction's
    summary; `outcome`: done, failed and left over every item (the exit status)."""

    model: str
    items: int
    computed: int
    failed: dict[str, str]
    reused: int
    speakers: dict[str, int]
    speech_seconds: float
    seconds: float
    extraction: ExtractSummary
    segments: dict[str, list[Segment]]
    outcome: Outcome = field(default_factory=Outcome)

    def as_dict(self) -> dict[str, Any]:
        d = super().as_dict()
        d["segments"] = {k: [[s.start, s.end, s.speaker] for s in v] for k, v in self.segments.items()}
        return d


@dataclass
class ClusterReport(Report):
    """Pseudo-speaker labels given to a dataset (`Store.cluster`): its live `items`, those
    `embedded`, their distinct vectors (`rows`), `clustered` and `unlabelled` items,
    `clusters`; `algorithm` "ahc" or "cells" (the staged path, with `cells`,
    `local_clusters`, `passes`); `threshold` and `num_speakers` as used; `speakers`,
    `purity`, `coverage` against the real labels when it has several; `outcome`: items
    left unlabelled because they failed or are not extracted yet."""

    dataset: str
    model: str
    items: int
    embedded: int
    rows: int
    clustered: int
    unlabelled: int
    clusters: int
    algorithm: str
    threshold: float | None = None
    num_speakers: int | None = None
    cells: int | None = None
    local_clusters: int | None = None
    passes: int | None = None
    speakers: int | None = None
    purity: float | None = None
    coverage: float | None = None
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    outcome: Outcome = field(default_factory=Outcome)

    # keys only some runs have: the staged path's, and those against real speaker labels
    OPTIONAL: ClassVar[tuple[str, ...]] = ("cells", "local_clusters", "passes", "speakers", "purity", "coverage")

    def as_dict(self) -> dict[str, Any]:
        return _without_none(super().as_dict(), self.OPTIONAL)


__all__ = [
    "options_from", "plain", "Report", "StatusReport", "Failure", "ErrorsReport", "ScoreReport", "Outlier",
    "OutliersReport", "DiarizeReport", "ClusterReport",
]
