"""`embstore report`: one self-contained HTML page about a store."""

from __future__ import annotations

import click

from embstore.cli.common import conclude, exit_status_documented, library_errors, model_option, open_store, store_argument
from embstore.cli.score import norm_options


@click.command()
@store_argument
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="The HTML file to write.")
@click.option("--trials", "trials", multiple=True, type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="A trial list to score each model on (repeat for several).")
@model_option
@norm_options
@click.option("--outliers", "outliers", type=int, default=20, show_default=True,
              help="Speaker outliers listed per model.")
@library_errors
@exit_status_documented
def report(store, out, trials, model, norm, mean_from, cohort, top_n, p_target, outliers):
    """Write one self-contained HTML report about STORE: summary, item durations per
    dataset, items per speaker, extraction runs over time, failures by reason, speaker
    outliers and, with --trials, a scoring section per model (table, DET curves, score
    histograms; same options as `embstore score`).

    The page has its pictures inline (SVG) and needs no network or script: open
    it offline, attach it to a mail, keep it as a CI artefact. Needs embstore[plot].

    \b
    Examples:
        embstore report store/ -o report.html
        embstore report store/ -o report.html --trials vox1_O.txt --trials vox1_H.txt \\
            --norm none,asnorm --mean-from dataset:vox2_dev --cohort dataset:vox2_dev
    """
    with open_store(store) as st:
        result = st.report(
            out, trials=list(trials), model=model, norm=list(norm), mean_from=mean_from, cohort=cohort,
            top_n=top_n, p_target=p_target, outliers=outliers,
        )
    click.echo(f"wrote {result.path} ({result.bytes / 1e6:.2f} MB; {', '.join(result.sections)})")
    conclude(result.outcome, store)


def register(cli: click.Group) -> None:
    cli.add_command(report)
