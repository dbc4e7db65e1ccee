"""`embstore report`: one self-contained HTML page about a store.

Every picture is an inline `<svg>` (matplotlib, text drawn as paths) and the styles are
in the page, so it opens offline, from a mail attachment or a CI artefact: no script, no
network reference. Sections: summary, durations per dataset, items per speaker,
extraction runs over time, failures by reason, scoring per model (given trial lists),
speaker outliers per model.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

import numpy as np

from embstore.api import Report
from embstore.errors import StoreError
from embstore.eval.outliers import OutlierOptions, find_outliers

# matplotlib itself is only imported when the first figure is drawn
from embstore.eval.plots import (
    bar_figure,
    det_figure,
    det_limits,
    hist_figure,
    histograms_figure,
    pyplot,
    score_ranges,
    series_figure,
    svg_text,
)
from embstore.eval.scoring import ScoreOptions, result_table, run_scoring
from embstore.manifest import reports
from embstore.manifest.database import Manifest
from embstore.outcome import Outcome

MAX_PANELS = 12        # datasets drawn one panel each; the rest are counted in the table
RUN_ROWS = 40          # most recent runs listed
RUN_METRICS = [        # (runs.summary key, panel title)
    ("x_realtime", "x realtime"),
    ("items_per_second", "items / s"),
    ("mean_batch_items", "mean batch (items)"),
    ("padding_overhead", "padding overhead"),
    ("failed", "failed items"),
]

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
       background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 18px 28px 60px; background: #fff; min-height: 100vh; }
h1 { font-size: 22px; margin: 8px 0 2px; }
h2 { font-size: 18px; margin: 34px 0 8px; padding-top: 10px; border-top: 1px solid #e3e5e8; }
h3 { font-size: 15px; margin: 20px 0 6px; }
.sub { color: #666; margin: 0 0 12px; }
nav a { margin-right: 14px; color: #1f5fa8; text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; }
th, td { border-bottom: 1px solid #e6e6e6; padding: 3px 10px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0 16px; }
.card { border: 1px solid #e3e5e8; border-radius: 6px; padding: 8px 14px; min-width: 110px; }
.card b { display: block; font-size: 20px; }
.card span { color: #666; font-size: 12px; }
figure { margin: 8px 0 16px; }
figure svg { max-width: 100%; height: auto; display: block; }
.row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.note { color: #666; font-style: italic; }
.warn { color: #8a4b00; }
.err { color: #a00; }
code { background: #f2f2f2; padding: 0 3px; border-radius: 3px; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table; numbers right-aligned, every cell escaped."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{_e(_fmt(c))}</td>' if _num(c) else f"<td>{_e(_fmt(c))}</td>" for c in row
        ) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(fig, caption: str = "") -> str:
    text = svg_text(fig)
    cap = f"<figcaption class='note'>{_e(caption)}</figcaption>" if caption else ""
    return f"<figure>{text}{cap}</figure>"


def _cards(pairs: Sequence[tuple[str, Any]]) -> str:
    return "<div class='cards'>" + "".join(
        f"<div class='card'><b>{_e(_fmt(v))}</b><span>{_e(k)}</span></div>" for k, v in pairs
    ) + "</div>"


# -- sections -----------------------------------------------------------------------------


def summary_section(store: Manifest, status: dict[str, Any]) -> str:
    hours = status["audio_seconds"] / 3600
    parts = [_cards([
        ("files", status["files"]), ("items", status["items"]), ("hours", hours),
        ("speakers", status["speakers"]), ("datasets", status["datasets"]), ("models", len(status["models"])),
        ("scan failures", status["scan_failed"]),
    ])]
    datasets = store.query(
        "SELECT coalesce(dataset, '') AS dataset, count(*) AS items, count(DISTINCT speaker) AS speakers,"
        " coalesce(sum(duration), 0) / 3600.0 AS hours FROM items WHERE removed = 0 GROUP BY 1 ORDER BY 2 DESC"
    )
    parts.append("<h3>Datasets</h3>")
    parts.append(table(["dataset", "items", "speakers", "hours"],
                       [[d["dataset"], d["items"], d["speakers"], round(d["hours"], 3)] for d in datasets]))
    if status["models"]:
        parts.append("<h3>Models</h3>")
        rows = []
        for key, m in status["models"].items():
            last = m.get("last_run") or {}
            rows.append([key, m["dim"], m["done"], m["failed"], m["pending"] + m["claimed"], m["rows"],
                         last.get("x_realtime"), last.get("batching"), last.get("runtime")])
        parts.append(table(["model", "dim", "done", "failed", "pending", "rows", "last x realtime", "batching",
                            "runtime"], rows))
    else:
        parts.append("<p class='note'>No model has been run on this store yet (<code>embstore extract</code>).</p>")
    return "".join(parts)


def durations_section(store: Manifest) -> str:
    groups: dict[str, list[float]] = {}
    for dataset, duration in store.conn.execute(
        "SELECT coalesce(dataset, ''), duration FROM items WHERE removed = 0 AND duration IS NOT NULL"
    ):
        groups.setdefault(dataset, []).append(duration)
    if not groups:
        return "<p class='note'>No items.</p>"
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    shown = dict(ordered[:MAX_PANELS])
    # a few very long recordings would squash every bar into the first bin
    cap = float(np.percentile(np.concatenate([np.asarray(v) for v in shown.values()]), 99.5))
    clipped = {k: np.minimum(np.asarray(v), cap) for k, v in shown.items()}
    rows = [[k, len(v), float(np.min(v)), float(np.median(v)), float(np.mean(v)), float(np.max(v))]
            for k, v in ordered]
    caption = f"Seconds per item; items longer than {cap:.1f} s (the 99.5th percentile) are counted in the last bin."
    if len(ordered) > MAX_PANELS:
        caption += f" The {MAX_PANELS} largest datasets are drawn."
    fig = histograms_figure(clipped, "Item durations per dataset", "seconds")
    return _figure(fig, caption) + table(["dataset", "items", "min s", "median s", "mean s", "max s"], rows)


def speakers_section(store: Manifest) -> str:
    counts = store.query(
        "SELECT coalesce(speaker, '') AS speaker, count(*) AS n, group_concat(DISTINCT dataset) AS datasets"
        " FROM items WHERE removed = 0 GROUP BY speaker"
    )
    n = np.array([c["n"] for c in counts], dtype=np.int64)
    if not len(n):
        return "<p class='note'>No items.</p>"
    spread = n.max() / max(n.min(), 1)
    fig = histograms_figure({"all speakers": n}, "Items per speaker", "items", log_y=spread > 50, integer=True)
    order = np.argsort(n, kind="stable")
    few = [[counts[i]["speaker"], counts[i]["datasets"], int(n[i])] for i in order[:8]]
    many = [[counts[i]["speaker"], counts[i]["datasets"], int(n[i])] for i in order[::-1][:8]]
    stats = _cards([("speakers", len(n)), ("min", int(n.min())), ("median", float(np.median(n))),
                    ("mean", float(n.mean())), ("max", int(n.max()))])
    return (stats + _figure(fig) + "<div class='row'><div><h3>Fewest items</h3>"
            + table(["speaker", "datasets", "items"], few) + "</div><div><h3>Most items</h3>"
            + table(["speaker", "datasets", "items"], many) + "</div></div>")


def _when(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def runs_section(store: Manifest) -> str:
    runs = store.query(
        "SELECT r.id, coalesce(m.name, '?') AS model, r.started_at, r.ended_at, r.status, r.items_done,"
        " r.items_failed, r.audio_seconds, r.summary FROM runs r LEFT JOIN models m ON m.id = r.model_id ORDER BY r.id"
    )
    if not runs:
        return "<p class='note'>No extraction runs recorded.</p>"
    parsed = []
    for r in runs:
        try:
            summary = json.loads(r["summary"]) if r["summary"] else {}
        except ValueError:
            summary = {}
        summary.setdefault("failed", r["items_failed"])
        parsed.append((r, summary, _when(r["started_at"])))
    panels: dict[str, list] = {}
    for key, title in RUN_METRICS:
        series = []
        for model in dict.fromkeys(r["model"] for r, _, _ in parsed):
            points = [(when, s.get(key)) for r, s, when in parsed
                      if r["model"] == model and when is not None and _num(s.get(key))]
            if points:
                series.append((model, [p[0] for p in points], [float(p[1]) for p in points]))
        if series:
            panels[title] = series
    parts = []
    if panels:
        parts.append(_figure(series_figure(panels, "Extraction runs over time (by start time)")))
    rows = []
    for r, s, when in parsed[::-1][:RUN_ROWS]:
        ended = _when(r["ended_at"])
        seconds = (ended - when).total_seconds() if when and ended else s.get("seconds")
        rows.append([r["id"], r["model"], r["started_at"], r["status"], seconds, r["items_done"], r["items_failed"],
                     round(r["audio_seconds"] / 3600, 3), s.get("x_realtime"), s.get("items_per_second"),
                     s.get("mean_batch_items"), s.get("padding_overhead"), s.get("batching"), s.get("runtime")])
    title = f"<h3>Runs (latest {min(len(parsed), RUN_ROWS)} of {len(parsed)})</h3>"
    parts.append(title + table(["run", "model", "started", "status", "seconds", "done", "failed", "audio h",
                                "x realtime", "items/s", "mean batch", "padding", "batching", "runtime"], rows))
    return "".join(parts)


def failures_section(status: dict[str, Any]) -> str:
    rows = [[key, reason, n] for key, m in status["models"].items() for reason, n in m["failures_by_reason"].items()]
    rows += [["scan", reason, n] for reason, n in status["scan_failures_by_reason"].items()]
    if not rows:
        return "<p class='note'>No failures: every scanned file was read and every task that ran succeeded.</p>"
    rows.sort(key=lambda r: -r[2])
    top = rows[:15]
    fig = bar_figure([f"{r[0]}: {r[1]}" for r in top], [r[2] for r in top], "Failures by reason", "items")
    caption = "Messages grouped by cause (paths and numbers masked)."
    return _figure(fig, caption) + table(["where", "reason", "items"], rows)


def scoring_section(store: Manifest, model_key: str, trials: Sequence[str], options: ScoreOptions) -> str:
    try:
        scoring = run_scoring(store, trials, model_key, options)
    except StoreError as exc:
        return f"<p class='err'>Cannot score with {_e(model_key)}: {_e(exc)}</p>"
    headers, rows = result_table([r.row() for r in scoring.results], scoring.p_targets)
    parts = [table(headers, rows)]
    described = ", ".join(f"{k} {v}" for k, v in scoring.options.items() if v is not None)
    if described:
        parts.append(f"<p class='sub'>{_e(described)}</p>")
    parts += [f"<p class='warn'>{_e(w)}</p>" for w in scoring.warnings]
    limits = det_limits(scoring.results)
    ranges = score_ranges(scoring.results)
    by_list: dict[str, list] = {}
    for r in scoring.results:
        by_list.setdefault(r.trials.path, []).append(r)
    figures = [_figure(det_figure(group, limits, title=f"DET: {group[0].trials.name}")) for group in by_list.values()]
    parts.append("<div class='row'>" + "".join(figures) + "</div>")
    parts += [_figure(hist_figure(group, ranges)) for group in by_list.values()]
    return "".join(parts)


def outliers_section(store: Manifest, model_key: str, top: int) -> str:
    try:
        found = find_outliers(store, OutlierOptions(model=model_key, top=top))
    except StoreError as exc:
        return f"<p class='note'>{_e(exc)}</p>"
    rows = [[o["id"], o["speaker"], o["dataset"], round(o["score"], 4), o["items"], o["nearest_speaker"],
             None if o["nearest_score"] is None else round(o["nearest_score"], 4)] for o in found]
    return (
        f"<p class='sub'>The {len(found)} items furthest from their own speaker (cosine to the mean of the"
        " speaker's other items), with the closest other speaker. Likely label errors or bad audio.</p>"
        + table(["item", "speaker", "dataset", "cosine to own speaker", "speaker items", "nearest other speaker",
                 "cosine to it"], rows)
    )


# -- the page -----------------------------------------------------------------------------


REPORT_OPTIONS = ("trials", "model", "outliers")


@dataclass(frozen=True)
class ReportOptions:
    """What the report holds; checked when made. trials: lists scored per model (a
    scoring section each, under `scoring`'s norms and priors); model: only this model;
    outliers: speaker outliers listed per model."""

    trials: Sequence[str | os.PathLike] = ()
    model: str | None = None
    outliers: int = 20
    scoring: ScoreOptions = field(default_factory=ScoreOptions)

    def __post_init__(self) -> None:
        if self.outliers < 1:
            raise StoreError(f"--outliers must be at least 1 (got {self.outliers})")


@dataclass
class HtmlReport(Report):
    """The page written (`path`, its `bytes`), its `sections`, and what it covered of
    every model's items (`outcome`: failed or not extracted items are missing from it)."""

    path: str
    bytes: int
    sections: list[str]
    outcome: Outcome


def build_report(store: Manifest, out: str | os.PathLike, options: ReportOptions | None = None) -> HtmlReport:
    """Write the report to `out` (see `ReportOptions` for what it holds)."""
    from embstore.eval.trials import read_trials

    opts = options or ReportOptions()
    pyplot()  # fail before any work when matplotlib is missing
    score_options, model, outliers = opts.scoring, opts.model, opts.outliers
    trials = [str(t) for t in opts.trials]
    for t in trials:
        read_trials(t)  # a bad list fails now, not after minutes of charts
    models = [store.resolve_model(model)] if model else [m for m in store.models() if m.kind == "item"]
    keys = [store.model_key(m) for m in models]
    status = reports.status(store.conn, str(store.path))

    sections: list[tuple[str, str, str]] = [
        ("summary", "Summary", summary_section(store, status)),
        ("durations", "Durations", durations_section(store)),
        ("speakers", "Items per speaker", speakers_section(store)),
        ("runs", "Extraction runs", runs_section(store)),
        ("failures", "Failures", failures_section(status)),
    ]
    if trials:
        body = "".join(f"<h3>{_e(k)}</h3>" + scoring_section(store, k, trials, score_options) for k in keys)
        sections.append(("scoring", "Scoring", body or "<p class='note'>No model to score.</p>"))
    body = "".join(f"<h3>{_e(k)}</h3>" + outliers_section(store, k, outliers) for k in keys)
    sections.append(("outliers", "Speaker outliers", body or "<p class='note'>No model: no embeddings to compare.</p>"))

    generated = datetime.now().astimezone().isoformat(timespec="seconds")
    nav = "".join(f"<a href='#{sid}'>{_e(title)}</a>" for sid, title, _ in sections)
    content = "".join(f"<section id='{sid}'><h2>{_e(title)}</h2>{body}</section>" for sid, title, body in sections)
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>embstore report: {_e(store.path.name)}</title><style>{STYLE}</style></head><body><main>"
        f"<h1>embstore report</h1><p class='sub'>{_e(store.path)} &middot; generated {_e(generated)}</p>"
        f"<nav>{nav}</nav>{content}</main></body></html>\n"
    )
    out = str(out)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, out)
    # the report describes every item of each model: those failed or not extracted yet are missing from it
    outcome = Outcome(noun="items" if len(models) < 2 else "item embeddings")
    for m, key in zip(models, keys):
        outcome = outcome.add(reports.coverage(store.conn, m.id, model_key=key))
    return HtmlReport(out, len(page.encode("utf-8")), [sid for sid, _, _ in sections], outcome)


__all__ = ["build_report", "table", "ReportOptions", "HtmlReport", "REPORT_OPTIONS"]
