"""Pictures of scores and of a store: DET curves, score histograms, small bar/line charts.

matplotlib (the `embstore[plot]` extra) is imported on first use with the Agg backend,
so nothing here needs a display and `embstore --help` never loads it. Figures come out
as PNG/SVG files or as text to inline in an HTML report.
"""

from __future__ import annotations

import base64
import io
import os
import re
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from embstore.errors import StoreError

if TYPE_CHECKING:
    from embstore.eval.metrics import Evaluation

# DET axis ticks (error rates); the axes show the part of this range the curves use
DET_TICKS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 0.9, 0.95]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


class Scored(Protocol):
    """What a DET curve or a histogram needs of one scored list (`ScoredList` has it)."""

    trials: Any  # TrialList: .path and .name
    norm: str
    scores: np.ndarray
    evaluation: "Evaluation"

    @property
    def labels(self) -> np.ndarray: ...

    @property
    def label(self) -> str: ...


def pyplot():
    """matplotlib.pyplot on the Agg backend; a one-line error when matplotlib is absent."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise StoreError("plots need matplotlib: pip install 'embstore[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    # text as paths: SVGs render the same everywhere, with no font to fetch
    matplotlib.rcParams.update({"svg.fonttype": "path", "font.size": 9, "axes.titlesize": 10})
    return plt


def _probit(rates: np.ndarray) -> np.ndarray:
    from scipy.stats import norm

    return norm.ppf(np.clip(rates, 1e-6, 1 - 1e-6))


def _thin(x: np.ndarray, y: np.ndarray, step: float = 0.004) -> tuple[np.ndarray, np.ndarray]:
    """At most one point per `step` of path length: a million-trial curve in ~2k points."""
    if len(x) < 2000:
        return x, y
    travelled = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    _, first = np.unique(np.floor(travelled / step), return_index=True)
    keep = np.union1d(first, [len(x) - 1])
    return x[keep], y[keep]


def det_limits(results: Sequence[Scored]) -> tuple[float, float]:
    """One range of error rates for every curve, so several norms or lists compare."""
    smallest = 0.5
    for r in results:
        curve = r.evaluation.curve
        rates = np.concatenate([curve.miss, curve.fa])
        rates = rates[rates > 0]
        if len(rates):
            # the finest rate a list can show is one error among its trials
            smallest = min(smallest, max(float(rates.min()), 1.0 / max(curve.targets, curve.nontargets)))
    lo = max(t for t in DET_TICKS if t <= max(smallest, DET_TICKS[0]))
    return lo, 0.5


def _det_ticks(lo: float, hi: float, gap: float = 0.33) -> list[float]:
    """Ticks in [lo, hi] at least `gap` apart on the probit scale, so labels never overlap."""
    kept: list[float] = []
    for t in (t for t in DET_TICKS if lo <= t <= hi):
        if not kept or _probit(np.array([t]))[0] - _probit(np.array([kept[-1]]))[0] >= gap:
            kept.append(t)
    return kept


def det_figure(results: Sequence[Scored], limits: tuple[float, float] | None = None, title: str = "DET"):
    """One DET plot (probit axes) with a curve per result: its EER point a circle, its
    minDCF points (one per p_target) squares, diamonds, triangles."""
    plt = pyplot()
    lo, hi = limits or det_limits(results)
    fig, ax = plt.subplots(figsize=(5.4, 5.4), dpi=110)
    markers = "sD^v"
    for k, r in enumerate(results):
        ev = r.evaluation
        colour = COLOURS[k % len(COLOURS)]
        x, y = _thin(_probit(ev.curve.fa), _probit(ev.curve.miss))
        dcf = ", ".join(f"{v:.3f}" for v in ev.min_dcf.values())
        ax.plot(x, y, color=colour, lw=1.4, label=f"{r.label}: EER {100 * ev.eer:.2f}%, minDCF {dcf}")
        e = _probit(np.array([ev.eer]))[0]
        ax.plot([e], [e], "o", color=colour, ms=6, mfc="white", mew=1.5)
        for j, (fa, miss) in enumerate(ev.min_dcf_point.values()):
            ax.plot(*_probit(np.array([fa, miss])), marker=markers[j % 4], color=colour, ms=5, ls="none")
    ticks = _det_ticks(lo, hi)
    names = [f"{100 * t:g}" for t in ticks]
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_ticks(_probit(np.array(ticks)))
        axis.set_ticklabels(names)
    edge = _probit(np.array([lo, hi]))
    ax.set_xlim(*edge)
    ax.set_ylim(*edge)
    ax.plot(edge, edge, color="#bbbbbb", lw=0.8, ls=":")  # the EER diagonal
    from matplotlib.lines import Line2D

    # what the marks mean, once, in grey
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], ls="none", marker="o", mfc="white", mec="#555555", color="#555555", label="EER"))
    for j, p in enumerate(results[0].evaluation.min_dcf if results else {}):
        handles.append(Line2D([], [], ls="none", marker=markers[j % 4], color="#555555", label=f"minDCF p={p:g}"))
    ax.set_xlabel("false alarm rate (%)")
    ax.set_ylabel("miss rate (%)")
    ax.set_title(title)
    ax.grid(True, color="#e5e5e5", lw=0.6)
    # the top right (many misses and false alarms at once) is where no DET curve goes
    ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.92)
    fig.tight_layout()
    return fig


def score_ranges(results: Sequence[Scored]) -> dict[str, tuple[float, float]]:
    """Per norm, one score range over every list: histograms of one norm share an axis."""
    out: dict[str, tuple[float, float]] = {}
    for r in results:
        lo, hi = np.percentile(r.scores, [0.05, 99.95])
        was = out.get(r.norm, (lo, hi))
        out[r.norm] = (min(was[0], lo), max(was[1], hi))
    return out


def hist_figure(results: Sequence[Scored], ranges: dict[str, tuple[float, float]] | None = None, title: str = ""):
    """Target / non-target score densities, one panel per result, EER threshold marked."""
    plt = pyplot()
    ranges = ranges or score_ranges(results)
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.0), dpi=110, squeeze=False)
    for ax, r in zip(axes[0], results):
        lo, hi = ranges[r.norm]
        bins = np.linspace(lo, hi, 61)
        y = r.labels
        ax.hist(np.clip(r.scores[~y], lo, hi), bins=bins, density=True, alpha=0.55, color="#d62728", label="non-target")
        ax.hist(np.clip(r.scores[y], lo, hi), bins=bins, density=True, alpha=0.55, color="#1f77b4", label="target")
        ax.axvline(r.evaluation.eer_threshold, color="black", lw=1, ls="--", label="EER threshold")
        ax.set_title(f"{r.label}  (EER {100 * r.evaluation.eer:.2f}%)")
        ax.set_xlabel("score")
        ax.set_yticks([])
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def bar_figure(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str, horizontal: bool = True):
    """A plain bar chart (failure reasons, counts)."""
    plt = pyplot()
    height = max(1.6, 0.28 * len(labels) + 0.9) if horizontal else 3.0
    fig, ax = plt.subplots(figsize=(7.5, height), dpi=110)
    if horizontal:
        positions = np.arange(len(labels))[::-1]
        ax.barh(positions, values, color=COLOURS[0])
        ax.set_yticks(positions)
        ax.set_yticklabels([_short(t) for t in labels], fontsize=7)
        ax.set_xlabel(xlabel)
    else:
        ax.bar(np.arange(len(labels)), values, color=COLOURS[0])
        ax.set_xticks(np.arange(len(labels)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def histograms_figure(
    groups: dict[str, np.ndarray], title: str, xlabel: str, bins: int = 40, log_y: bool = False,
    integer: bool = False,
):
    """One histogram panel per group (dataset...), sharing the x axis; `integer` data
    (counts) get one bar per value when they span at most `bins` values."""
    plt = pyplot()
    groups = {k: np.asarray(v, dtype=np.float64) for k, v in groups.items() if len(v)}
    cols = min(3, max(1, len(groups)))
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.5 * rows + 0.4), dpi=110, squeeze=False,
                             sharex=True)
    everything = np.concatenate(list(groups.values())) if groups else np.zeros(1)
    lo, hi = float(everything.min()), float(everything.max())
    if integer and hi - lo < bins:
        edges = np.arange(lo - 0.5, hi + 1.5)
    else:
        edges = np.histogram_bin_edges(everything, bins=bins)
    for ax in axes.ravel()[len(groups):]:
        ax.set_visible(False)
    for k, (ax, (name, values)) in enumerate(zip(axes.ravel(), groups.items())):
        ax.hist(values, bins=edges, color=COLOURS[k % len(COLOURS)])
        ax.set_title(f"{_short(name, 40)} (n={len(values)})", fontsize=8)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def series_figure(panels: dict[str, list[tuple[str, Sequence[Any], Sequence[float]]]], title: str):
    """Small line charts over time: {panel: [(series name, datetimes, values)]}."""
    plt = pyplot()
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.9 * cols, 2.6 * rows + 0.4), dpi=110, squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    import matplotlib.dates as mdates

    for ax, (name, series) in zip(axes.ravel(), panels.items()):
        for k, (label, when, values) in enumerate(series):
            ax.plot(when, values, marker="o", ms=3, lw=1, color=COLOURS[k % len(COLOURS)], label=_short(label, 30))
        ax.set_title(name, fontsize=9)
        times = sorted({w for _, when, _ in series for w in when})
        if len(times) > 1:
            locator = mdates.AutoDateLocator(maxticks=5)
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        else:  # one run: a date locator has no interval to pick
            ax.set_xticks(times)
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d %H:%M"))
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, color="#eeeeee", lw=0.6)
        if len(series) > 1:
            ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _short(text: str, n: int = 60) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


# -- output -------------------------------------------------------------------------------


def save(fig, stem: str, formats: Sequence[str] = ("png", "svg")) -> list[str]:
    """Write `stem.<format>` for each format and close the figure."""
    paths = []
    try:
        for fmt in formats:
            path = f"{stem}.{fmt}"
            fig.savefig(path, format=fmt, metadata=_metadata(fmt))
            paths.append(path)
    finally:
        pyplot().close(fig)
    return paths


def _metadata(fmt: str) -> dict[str, Any] | None:
    # no creation date, no tool URL: files and reports stay byte-stable and offline
    if fmt == "svg":
        return {"Date": None, "Creator": None, "Format": None, "Type": None}
    if fmt == "png":
        return {"Software": None}
    return None


_SVG_PROLOGUE = re.compile(r"^.*?(?=<svg\b)", re.S)
_SVG_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)


def _render(fig, fmt: str) -> bytes:
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=fmt, metadata=_metadata(fmt))
    finally:
        pyplot().close(fig)
    return buffer.getvalue()


def svg_text(fig) -> str:
    """The figure as an `<svg>` element to inline in HTML (no XML prologue, no metadata)."""
    text = _SVG_PROLOGUE.sub("", _render(fig, "svg").decode("utf-8"), count=1)
    return _SVG_METADATA.sub("", text)


def png_data_uri(fig) -> str:
    return "data:image/png;base64," + base64.b64encode(_render(fig, "png")).decode("ascii")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "list"


def write_score_plots(
    folder: str | os.PathLike, results: Sequence[Scored], p_targets: Sequence[float] = (),
    formats: Sequence[str] = ("png", "svg"),
) -> list[str]:
    """Per trial list, `<list>_det` (every norm's curve) and `<list>_hist`; with several
    lists also `all_det`. Every DET shares one range, every histogram of a norm one range."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    by_list: dict[str, list[Scored]] = {}
    for r in results:
        by_list.setdefault(r.trials.path, []).append(r)
    limits = det_limits(results)
    ranges = score_ranges(results)
    written: list[str] = []
    used: set[str] = set()
    for group in by_list.values():
        name = _safe(group[0].trials.name)
        while name in used:
            name += "_"
        used.add(name)
        stem = os.path.join(folder, name)
        written += save(det_figure(group, limits, title=f"DET: {group[0].trials.name}"), stem + "_det", formats)
        written += save(hist_figure(group, ranges), stem + "_hist", formats)
    if len(by_list) > 1:
        written += save(det_figure(results, limits, title="DET: all lists"), os.path.join(folder, "all_det"), formats)
    return written


__all__ = [
    "pyplot", "det_figure", "det_limits", "hist_figure", "score_ranges", "bar_figure", "histograms_figure",
    "series_figure", "save", "svg_text", "png_data_uri", "write_score_plots",
]
