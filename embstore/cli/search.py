"""`embstore index`, `overlap`, `duplicates`: vector search over a store's rows."""

from __future__ import annotations

import click

from embstore.cli.common import echo_json, echo_table, json_option, library_errors, model_option, open_store, store_argument


@click.command()
@store_argument
@model_option
@click.option("--kind", type=click.Choice(["auto", "ivf", "flat"]), default="auto", show_default=True,
              help="auto: an IVF index from 200,000 rows on, none below; ivf: always; flat: none (drop it).")
@click.option("--rebuild", is_flag=True, help="Retrain from scratch rather than add the new rows.")
@click.option("--lists", type=click.IntRange(min=1), default=None,
              help="IVF lists (default: the power of two nearest 2 sqrt(rows)); a new value retrains.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None,
              help="Lists each query probes (default: lists/32, at least 16; range queries twice as many).")
@json_option
@library_errors
def index(store, model, kind, rebuild, lists, nprobe, as_json):
    """Build the model's ANN index in STORE/cache, or bring it up to date.

    Rows added since the last build are added without retraining, until the
    index drifts past its bound (rows added exceed the rows it was trained on,
    or they sit 1.25x as far from their centroids): then it is retrained. The
    index is published whole (a new file, then a pointer replaced atomically):
    queries running meanwhile use the previous one. Deleting STORE/cache is
    always safe.

    \b
    Examples:
        embstore index store/
        embstore index store/ --model campplus --rebuild
        embstore index store/ --kind ivf --json
    """
    with open_store(store) as st:
        report = st.index(model=model, kind=kind, rebuild=rebuild, lists=lists, nprobe=nprobe)
    if as_json:
        echo_json(report.as_json())
        return
    if report.action == "flat":
        click.echo(f"{report.model}: no index ({report.reason}); queries scan every row")
        return
    size = f", {report.bytes / max(report.rows, 1):.0f} B/row" if report.bytes else ""
    click.echo(f"{report.model}: {report.kind} {report.action} ({report.reason}): {report.rows} of "
               f"{report.committed} rows, nprobe {report.nprobe}{size}, {report.seconds:.1f} s")


@click.command()
@store_argument
@click.option("--from", "source", required=True, metavar="dataset:A", help="The dataset whose speakers are looked for.")
@click.option("--to", "target", required=True, metavar="dataset:B", help="The dataset they are looked for in.")
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=0.7, show_default=True,
              help="Cosine between speaker centroids (or, with --items, item to centroid) at or above which they match.")
@click.option("--items", is_flag=True, help="Match when any item of A's speaker is within the threshold of B's centroid.")
@model_option
@json_option
@library_errors
def overlap(store, source, target, threshold, items, model, as_json):
    """Speakers of one dataset that also speak in another: the leakage check.

    Every speaker of dataset A whose centroid (the mean of its normalised
    embeddings) is within --threshold cosine of a speaker centroid of dataset
    B, best first, with the score. Exact: every pair of centroids is scored.

    \b
    Examples:
        embstore overlap store/ --from dataset:test --to dataset:train
        embstore overlap store/ --from test --to train --threshold 0.8 --json
        embstore overlap store/ --from test --to train --items
    """
    with open_store(store) as st:
        report = st.overlap(source=_dataset(source), target=_dataset(target), threshold=threshold, model=model,
                            items=items)
    if as_json:
        echo_json(report.as_json())
        return
    echo_table(
        [{"speaker": p.speaker, "other": p.other, "score": f"{p.score:.4f}", "items": p.items,
          "other_items": p.other_items, **({"item": p.item, "matches": p.matches} if items else {})}
         for p in report.pairs],
        ["speaker", "other", "score", "items", "other_items"] + (["item", "matches"] if items else []),
    )
    click.echo(f"{len({p.speaker for p in report.pairs})} of {report.speakers} speakers of {report.source} match one "
               f"of {report.target_speakers} in {report.target} at >= {threshold} ({report.seconds:.1f} s)", err=True)


def _dataset(text: str) -> str:
    name = text[len("dataset:"):] if text.startswith("dataset:") else text
    if not name:
        raise click.BadParameter(f"{text!r}: give a dataset name, e.g. dataset:train")
    return name


@click.command()
@store_argument
@click.option("--min-score", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.98, show_default=True,
              help="Cosine at or above which two items are near-duplicates.")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True, help="Pairs listed at most.")
@model_option
@json_option
@library_errors
def duplicates(store, min_score, limit, model, as_json):
    """Pairs of items whose embeddings are near-identical.

    Re-encoded, resampled or trimmed copies of one recording, which the byte
    hash misses (byte-identical files were already deduplicated at extraction
    and are not listed). Compared within the ANN index's lists (built first
    when the model has none and more than 20,000 rows, and given the rows
    added since it was built), exactly.

    \b
    Examples:
        embstore duplicates store/
        embstore duplicates store/ --min-score 0.95 --limit 100 --json
    """
    with open_store(store) as st:
        report = st.near_duplicates(min_score=min_score, model=model, limit=limit)
    if as_json:
        echo_json(report.as_json())
        return
    echo_table(
        [{"score": f"{p.score:.4f}", "a": p.a, "b": p.b, "speakers": f"{p.speaker_a} / {p.speaker_b}"}
         for p in report.pairs],
        ["score", "a", "b", "speakers"],
    )
    click.echo(f"{report.total} pairs at >= {min_score} among {report.rows} rows ({report.index}, "
               f"{report.seconds:.1f} s)" + (f"; the first {limit} listed" if report.total > limit else ""), err=True)


def register(cli: click.Group) -> None:
    for command in (index, overlap, duplicates):
        cli.add_command(command)
