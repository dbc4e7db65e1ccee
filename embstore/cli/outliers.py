"""`embstore outliers`: items far from their own speaker (label noise, bad audio)."""

from __future__ import annotations

import click

from embstore.cli.common import echo_json, echo_table, json_option
from embstore.cli.common import library_errors, model_option, open_store, store_argument


@click.command()
@store_argument
@model_option
@click.option("--dataset", default=None, help="Only items of this dataset.")
@click.option("--speaker", default=None, help="Only items of this speaker.")
@click.option("--top", type=int, default=None, help="The K furthest items (default 20).")
@click.option("--below", type=float, default=None, metavar="COS",
              help="Every item whose cosine to its own speaker is below COS (instead of --top).")
@json_option
@library_errors
def outliers(store, model, dataset, speaker, top, below, as_json):
    """List the items furthest from their own speaker, worst first, with the
    nearest other speaker: where wrong speaker labels and bad audio hide.

    An item's score is the cosine between its embedding and the mean of its
    speaker's other items (leave-one-out centroid); a negative margin means it
    sits closer to another speaker's centroid than to its own.

    \b
    Examples:
        embstore outliers store/ --top 50
        embstore outliers store/ --dataset vox2_dev --below 0.3 --json
        embstore outliers store/ --speaker id10001
    """
    if top is not None and below is not None:
        raise click.UsageError("give --top or --below, not both")
    with open_store(store) as st:
        found = st.outliers(model=model, dataset=dataset, speaker=speaker,
                            top=20 if top is None else top, below=below)
    if as_json:
        echo_json(found.as_json())
        return
    rows = [
        {"item": o.id, "speaker": o.speaker, "cos own": f"{o.score:.4f}", "n": o.items,
         "nearest other": o.nearest_speaker or "-",
         "cos other": "-" if o.nearest_score is None else f"{o.nearest_score:.4f}",
         "margin": "-" if o.margin is None else f"{o.margin:+.4f}"}
        for o in found.outliers
    ]
    echo_table(rows, ["item", "speaker", "cos own", "n", "nearest other", "cos other", "margin"])


def register(cli: click.Group) -> None:
    cli.add_command(outliers)
