"""Scoring a store's trial lists: raw cosine, mean subtraction, S-norm, AS-norm.

Several trial lists are scored in one pass: their ids are resolved together, every
embedding is read once, and each trial side gets its cohort statistics once however
many lists and norms use it. See `embstore.eval.norm` for the recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from embstore.errors import StoreError
from embstore.eval.metrics import Evaluation, evaluate
from embstore.eval.norm import (
    check_norm_options,
    cohort_stats,
    cohort_vectors,
    grouped_sums,
    pair_scores,
    symmetric_norm,
    to_unit,
)
from embstore.eval.selection import resolve_selection
from embstore.eval.trials import TrialList, read_trials
from embstore.manifest import reads
from embstore.manifest.database import Manifest
from embstore.manifest.registry import ModelRecord
from embstore.outcome import Outcome
from embstore.query import resolve_ids

MISSING_LISTED = 20  # missing ids named per list; the count is always complete


@dataclass
class ScoredList:
    """One trial list under one normalisation: the final scores of its scored trials."""

    trials: TrialList
    norm: str                 # label: none, mean, snorm, asnorm300, mean+asnorm300...
    kept: np.ndarray          # bool over the list's trials: both ids have an embedding
    scores: np.ndarray        # float64, one per kept trial, in file order
    evaluation: Evaluation
    missing_ids: list[str]

    @property
    def labels(self) -> np.ndarray:
        return self.trials.labels[self.kept]

    @property
    def label(self) -> str:
        return f"{self.trials.name} {self.norm}"

    def row(self) -> dict[str, Any]:
        targets = int(self.labels.sum())
        return {
            "list": self.trials.name, "path": self.trials.path, "norm": self.norm,
            "trials": int(self.kept.sum()), "targets": targets, "nontargets": int(self.kept.sum()) - targets,
            "missing": int((~self.kept).sum()), "missing_ids": self.missing_ids[:MISSING_LISTED],
            "missing_ids_total": len(self.missing_ids),
        } | self.evaluation.as_dict()


@dataclass
class Scoring:
    """Everything one `score` call computed, before it is written anywhere."""

    model: str
    results: list[ScoredList]
    p_targets: list[float]
    warnings: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    # the trial ids with an embedding, failed, or left (the exit status)
    outcome: Outcome = field(default_factory=Outcome)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return list(value)


def parse_p_targets(value: float | str | Sequence[float]) -> list[float]:
    """0.01 / "0.01,0.05" / [0.01, 0.05] -> a list of priors, each in (0, 1)."""
    if isinstance(value, str):
        try:
            values = [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise StoreError(f"--p-target {value!r}: expected numbers separated by commas") from None
    elif isinstance(value, (int, float)):
        values = [float(value)]
    else:
        values = [float(v) for v in value]
    if not values:
        raise StoreError("--p-target needs at least one value")
    for p in values:
        if not 0.0 < p < 1.0:
            raise StoreError(f"--p-target must be between 0 and 1 (got {p:g})")
    return list(dict.fromkeys(values))


def parse_norms(value: str | Sequence[str]) -> list[str]:
    """"none" / "none,asnorm" / ["none", "asnorm"] -> the norms in order, once each."""
    parts = [p.strip().lower() for v in _as_list(value) for p in str(v).split(",") if p.strip()]
    return list(dict.fromkeys(parts)) or ["none"]


@dataclass
class ScoreOptions:
    """How trial lists are scored; checked when made, before anything is read.

    norm: none|mean|snorm|asnorm, or several (a list or "none,asnorm"): one result per
    list and norm. mean_from / cohort: SELs (`embstore.eval.selection`); mean_from
    subtracts that mean under every norm. top_n: AS-norm's cohort size per side (all of
    the cohort, with a warning, when it is smaller). p_target: the priors of minDCF and
    of the actual DCF, taken at the EER threshold; c_miss / c_fa: the DCF's costs."""

    norm: str | Sequence[str] = "none"
    mean_from: str | None = None
    cohort: str | None = None
    top_n: int = 300
    p_target: float | str | Sequence[float] = (0.01, 0.05)
    c_miss: float = 1.0
    c_fa: float = 1.0
    norms: list[str] = field(init=False)
    p_targets: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.norms = parse_norms(self.norm)
        check_norm_options(self.norms, self.mean_from, self.cohort, self.top_n)
        self.p_targets = parse_p_targets(self.p_target)
        if self.c_miss <= 0 or self.c_fa <= 0:
            raise StoreError("--c-miss and --c-fa must be positive")


def _ids_outcome(store: Manifest, m: ModelRecord, ids: list[str], item_of: dict[str, int | None],
                 row_of_item: dict[int, int]) -> Outcome:
    """What the trial ids have: an embedding (done), a failed task (failed), or neither:
    not extracted yet, or not in the store at all (left, with why)."""
    # counted per trial id: two ids (a stem and a path) may name one item
    waiting = [i for i in ids if item_of[i] is not None and item_of[i] not in row_of_item]
    failed_items = reads.failed_items(store.conn, m.id, sorted({item_of[i] for i in waiting}))
    failed = sum(1 for i in waiting if item_of[i] in failed_items)
    unknown = sum(1 for i in ids if item_of[i] is None)
    why = []
    if len(waiting) > failed:
        why.append(f"{len(waiting) - failed} not extracted yet with {store.model_key(m)} (run `embstore extract`)")
    if unknown:
        why.append(f"{unknown} not in the store (scan their audio first)")
    return Outcome(done=len(ids) - len(waiting) - unknown, failed=failed, left=len(waiting) - failed + unknown,
                   why_left="; ".join(why), noun="trial ids")


def _norm_labels(norms: list[str], has_mean: bool, top_n: int) -> list[tuple[str, str]]:
    """(norm, label) in order; `none` with a mean is `mean`, so it appears once."""
    out: list[tuple[str, str]] = []
    for norm in norms:
        base = "mean" if norm == "none" and has_mean else norm
        label = {"snorm": "snorm", "asnorm": f"asnorm{top_n}"}.get(base, base)
        if has_mean and base in ("snorm", "asnorm"):
            label = "mean+" + label
        if label not in [lab for _, lab in out]:
            out.append((base, label))
    return out


def _cohort(
    store: Manifest, m: ModelRecord, sel: str, mean: np.ndarray | None, read, warnings: list[str]
) -> np.ndarray:
    chosen = resolve_selection(store, m, sel, what="--cohort")
    warnings += chosen.warnings
    names, index = chosen.speaker_index()
    if len(names) < 2:
        raise StoreError(
            f"--cohort {sel} holds {len(names)} speaker ({names[0]!r}); S-norm and AS-norm need at least 2"
        )
    sums, counts = grouped_sums(read, chosen.rows, index, len(names), m.dim)
    return cohort_vectors(sums, counts, mean)


def run_scoring(
    store: Manifest,
    trials: str | os.PathLike | Sequence[str | os.PathLike],
    model: str | None = None,
    options: ScoreOptions | None = None,
    **kwargs: Any,
) -> Scoring:
    """Score every trial list under every norm: `options`, or a ScoreOptions made of kwargs."""
    opts = options if options is not None else ScoreOptions(**kwargs)
    norms, mean_from, cohort, top_n, p_targets = opts.norms, opts.mean_from, opts.cohort, opts.top_n, opts.p_targets
    paths = list(dict.fromkeys(str(p) for p in _as_list(trials)))  # a list given twice is scored once
    if not paths:
        raise StoreError("give at least one trial list")
    m = store.resolve_model(model)
    lists = [read_trials(p) for p in paths]
    warnings: list[str] = []

    # every id of every list as a number, resolved and read once
    code_of: dict[str, int] = {}
    sides = [
        [np.fromiter((code_of.setdefault(i, len(code_of)) for i in side), dtype=np.int64, count=len(side))
         for side in (t.enroll, t.test)]
        for t in lists
    ]
    ids = list(code_of)
    item_of = resolve_ids(store, ids)
    row_of_item = reads.done_rows_of(store.conn, m.id, sorted({i for i in item_of.values() if i is not None}))
    rows = np.array(sorted(set(row_of_item.values())), dtype=np.int64)
    slot_of_row = {int(r): k for k, r in enumerate(rows)}
    # the slot (row of `unit`) of each id code, -1 for an id without an embedding
    slot_of = np.array([slot_of_row.get(row_of_item.get(item_of[i], -1), -1) for i in ids], dtype=np.int64)
    arrays = store.model_arrays(m)
    read = arrays.read_rows

    mean = None
    options: dict[str, Any] = {"mean_from": mean_from, "cohort": cohort}
    if mean_from is not None:
        chosen = resolve_selection(store, m, mean_from, what="--mean-from")
        warnings += chosen.warnings
        sums, counts = grouped_sums(read, chosen.rows, np.zeros(len(chosen), np.int64), 1, m.dim)
        mean = sums[0] / counts[0]
        options["mean_items"] = len(chosen)
    unit = to_unit(read(rows), mean)

    labelled = _norm_labels(norms, mean is not None, top_n)
    if mean is not None and "none" in norms:
        warnings.append("--mean-from applies under every --norm: `none` is scored as `mean`")
    stats: dict[int | None, tuple[np.ndarray, np.ndarray]] = {}
    if any(n in ("snorm", "asnorm") for n, _ in labelled):
        cohort_unit = _cohort(store, m, cohort, mean, read, warnings)
        options["cohort_speakers"] = len(cohort_unit)
        if top_n > len(cohort_unit) and any(n == "asnorm" for n, _ in labelled):
            warnings.append(
                f"--top-n {top_n} is more than the cohort's {len(cohort_unit)} speakers; AS-norm uses all of them"
            )
            top_n = len(cohort_unit)
            labelled = _norm_labels(norms, mean is not None, top_n)
        options["top_n"] = top_n
        wanted = [None if n == "snorm" else top_n for n, _ in labelled if n in ("snorm", "asnorm")]
        stats = cohort_stats(unit, cohort_unit, list(dict.fromkeys(wanted)))

    results: list[ScoredList] = []
    for t, (enroll_codes, test_codes) in zip(lists, sides):
        left, right = slot_of[enroll_codes], slot_of[test_codes]
        kept = (left >= 0) & (right >= 0)
        codes = np.concatenate([enroll_codes[left < 0], test_codes[right < 0]])
        missing_ids = [ids[c] for c in codes[np.sort(np.unique(codes, return_index=True)[1])]]
        if not kept.any():
            raise StoreError(f"{t.path}: none of the {len(t)} trials has both ids in the store ({store.model_key(m)})")
        left, right = left[kept], right[kept]
        raw = pair_scores(unit, left, right)
        for base, label in labelled:
            if base in ("snorm", "asnorm"):
                mu, sigma = stats[None if base == "snorm" else top_n]
                final = symmetric_norm(raw, left, right, mu, sigma)
            else:
                final = raw
            try:
                evaluation = evaluate(final, t.labels[kept], p_targets, opts.c_miss, opts.c_fa)
            except ValueError as exc:
                raise StoreError(
                    f"cannot score {t.path}: {exc} ({int(kept.sum())} trials scored, {int((~kept).sum())} missing)"
                ) from None
            results.append(ScoredList(t, label, kept, final, evaluation, missing_ids))
        if missing_ids:
            warnings.append(
                f"{t.name}: {int((~kept).sum())} of {len(t)} trials skipped; {len(missing_ids)} ids have no"
                f" embedding in the store ({', '.join(missing_ids[:5])}{', ...' if len(missing_ids) > 5 else ''})"
            )
    return Scoring(store.model_key(m), results, p_targets, warnings, options,
                   _ids_outcome(store, m, ids, item_of, row_of_item))


# -- writing scores ------------------------------------------------------------------------


def score_file_paths(target: str | os.PathLike, results: Sequence[ScoredList]) -> list[str]:
    """Where each result's scores go: TARGET itself for one result (unless it is a
    folder), else one file per result inside the folder TARGET."""
    target = str(target)
    is_dir = os.path.isdir(target) or target.endswith(os.sep)
    if len(results) == 1 and not is_dir:
        return [target]
    if os.path.exists(target) and not os.path.isdir(target):
        raise StoreError(f"--scores {target}: several score files go into a folder, and this is a file")
    several_norms = len({r.norm for r in results}) > 1
    paths: list[str] = []
    for r in results:
        name = f"{r.trials.name}.{r.norm}.score" if several_norms else f"{r.trials.name}.score"
        candidate, k = os.path.join(target, name), 2
        while candidate in paths:  # two lists with one file name, from different folders
            candidate, k = os.path.join(target, f"{k}-{name}"), k + 1
        paths.append(candidate)
    return paths


def write_scores(path: str, result: ScoredList) -> None:
    """`<enroll> <test> <score> <target|nontarget>` per scored trial, ids as in the trial file."""
    enroll = np.asarray(result.trials.enroll, dtype=object)[result.kept]
    test = np.asarray(result.trials.test, dtype=object)[result.kept]
    words = np.where(result.labels, "target", "nontarget")
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, len(enroll), 65536):
            part = slice(start, start + 65536)
            lines = zip(enroll[part], test[part], result.scores[part], words[part])
            f.write("".join(f"{a} {b} {s:.6f} {w}\n" for a, b, s, w in lines))


def score(
    store: Manifest,
    trials: str | os.PathLike | Sequence[str | os.PathLike],
    model: str | None = None,
    scores: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    options: ScoreOptions | None = None,
) -> dict[str, Any]:
    """Score one or several trial lists with the store's embeddings.

    options: a `ScoreOptions` (norm, mean_from, cohort, top_n, p_target, c_miss, c_fa;
    the defaults when None). scores: a file (one result) or a folder (one `<list>[.<norm>].score` file
    each) of `<enroll> <test> <score> <target|nontarget>` lines. plot: a folder for DET
    curves and score histograms (PNG and SVG; needs matplotlib, `embstore[plot]`).

    Returns {"model", "results": [one dict per list and norm: list, norm, trials,
    targets, nontargets, missing, missing_ids, eer, eer_threshold, min_dcf {p: v},
    act_dcf {p: v}, ...], "warnings", "options", "score_files", "plots", "outcome"} (outcome: an
    `embstore.outcome.Outcome` over the trial ids: with an embedding, failed, or left)."""
    scoring = run_scoring(store, trials, model, options or ScoreOptions())
    out: dict[str, Any] = {
        "model": scoring.model, "results": [r.row() for r in scoring.results], "warnings": scoring.warnings,
        "options": scoring.options | {"p_targets": scoring.p_targets}, "score_files": [], "plots": [],
        "outcome": scoring.outcome,
    }
    if scores is not None:
        for path, result in zip(score_file_paths(scores, scoring.results), scoring.results):
            write_scores(path, result)
            out["score_files"].append(path)
    if plot is not None:
        from embstore.eval.plots import write_score_plots

        out["plots"] = write_score_plots(plot, scoring.results, scoring.p_targets)
    return out


def score_trials(
    store: Manifest,
    trials: str | os.PathLike,
    model: str | None = None,
    p_target: float = 0.01,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
    scores_out: str | None = None,
) -> dict:
    """The 0.1 API: raw cosine of one list -> {"eer", "min_dcf", "trials", "missing",
    "targets", "nontargets", "model"}; `scores_out` gets the score file."""
    out = score(store, trials, model=model, p_target=p_target, c_miss=c_miss, c_fa=c_fa, scores=scores_out)
    row = out["results"][0]
    return {
        "eer": row["eer"], "min_dcf": next(iter(row["min_dcf"].values())), "trials": row["trials"],
        "missing": row["missing"], "targets": row["targets"], "nontargets": row["nontargets"], "model": out["model"],
    }


def result_table(results: Sequence[dict[str, Any]], p_targets: Sequence[float]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of text) of `score` results: the table the CLI and the report show."""
    headers = ["list", "norm", "trials", "missing", "EER %"]
    headers += [f"minDCF {p:g}" for p in p_targets] + [f"actDCF {p:g}" for p in p_targets]
    rows = []
    for r in results:
        rows.append(
            [r["list"], r["norm"], str(r["trials"]), str(r["missing"]), f"{100 * r['eer']:.3f}"]
            + [f"{r['min_dcf'][f'{p:g}']:.4f}" for p in p_targets]
            + [f"{r['act_dcf'][f'{p:g}']:.4f}" for p in p_targets]
        )
    return headers, rows


__all__ = [
    "ScoredList", "Scoring", "run_scoring", "score", "score_trials", "write_scores", "score_file_paths",
    "result_table", "parse_p_targets", "parse_norms",
]
