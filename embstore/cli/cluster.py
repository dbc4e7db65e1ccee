"""`embstore cluster`."""

from __future__ import annotations

import click

from embstore.cli.common import conclude, echo_json, exit_status_documented, json_option, library_errors, model_option, open_store, store_argument


@click.command()
@store_argument
@click.option("--dataset", required=True, help="The dataset whose items get pseudo-speaker labels.")
@model_option
@click.option("--threshold", type=float, default=None,
              help="Average cosine similarity above which clusters merge (default: tuned for the default model).")
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
        embstore cluster store/ --dataset podcasts --threshold 0.7 --json
        embstore cluster store/ --dataset interviews --num-speakers 40
    """
    with open_store(store) as st:
        report = st.cluster(dataset, model=model, threshold=threshold, num_speakers=num_speakers)
    outcome = report.pop("outcome")
    if as_json:
        echo_json(report | {"outcome": outcome.as_dict()})
    else:
        extra = f", purity {report['purity']:.3f}, coverage {report['coverage']:.3f}" if "purity" in report else ""
        click.echo(f"{report['dataset']}: {report['clustered']} items in {report['clusters']} clusters "
                   f"({report['unlabelled']} unlabelled; {report['algorithm']}, {report['seconds']:.1f}s){extra}")
    conclude(outcome, store)


def register(cli: click.Group) -> None:
    cli.add_command(cluster)
