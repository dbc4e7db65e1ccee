"""`embstore cluster`."""

from __future__ import annotations

import click

from embstore.cli.common import conclude, echo_json, exit_status_documented, json_option, library_errors, model_option, open_store, store_argument


@click.command()
@store_argument
@click.option("--dataset", required=True, help="The dataset whose items get pseudo-speaker labels.")
@model_option
@click.option("--threshold", type=float, default=None,
              help="Average cosine similarity above which clusters merge (default: the value tuned for the "
                   "store's model: 0.5 for campplus, 0.725 for resemblyzer; 0.725 for others).")
@click.option("--num-speakers", type=click.IntRange(1), default=None, help="Exactly this many clusters.")
@json_option
@library_errors
@exit_status_documented
def cluster(store, dataset, model, threshold, num_speakers, as_json):
    """Give the embedded items of an unlabelled DATASET pseudo-speaker labels.

    Labels (c0001 = the largest cluster) are stored beside the real speaker
    label, replacing the dataset's earlier ones. Up to 4096 distinct vectors:
    exact average-linkage AHC; above: streamed k-means cells, AHC per cell and
    a merge of the local clusters, in memory that does not grow with the corpus.
    When the dataset has real speaker labels, purity and coverage are reported.

    \b
    Examples:
        embstore cluster store/ --dataset podcasts
        embstore cluster store/ --dataset podcasts --threshold 0.55 --json
        embstore cluster store/ --dataset interviews --num-speakers 40
    """
    with open_store(store) as st:
        report = st.cluster(dataset, model=model, threshold=threshold, num_speakers=num_speakers)
    if as_json:
        echo_json(report.as_json())
    else:
        extra = "" if report.purity is None else f", purity {report.purity:.3f}, coverage {report.coverage:.3f}"
        click.echo(f"{report.dataset}: {report.clustered} items in {report.clusters} clusters "
                   f"({report.unlabelled} unlabelled; {report.algorithm}, {report.seconds:.1f}s){extra}")
    conclude(report.outcome, store)


def register(cli: click.Group) -> None:
    cli.add_command(cluster)
