"""`embstore score`: EER, minDCF and actual DCF of trial lists, with the field's score
normalisation (mean subtraction, S-norm, AS-norm), score files and DET plots."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import click

from embstore.cli.common import conclude, echo_json, echo_table, exit_status_documented, json_option, library_errors
from embstore.cli.common import model_option, open_store, store_argument

if TYPE_CHECKING:
    from embstore.api import ScoreReport

SEL = "SEL"


def norm_options(fn: Callable) -> Callable:
    """--norm, --mean-from, --cohort, --top-n, --p-target: shared by `score` and `report`."""
    options = [
        click.option("--norm", "norm", multiple=True, default=("none",), show_default=True,
                     metavar="none|mean|snorm|asnorm",
                     help="Score normalisation; repeat it or give a comma list to compare several."),
        click.option("--mean-from", metavar=SEL, default=None,
                     help="Subtract the mean embedding of these items (from every embedding, under any --norm)."),
        click.option("--cohort", metavar=SEL, default=None,
                     help="Items of the cohort speakers for snorm/asnorm (one mean vector per speaker)."),
        click.option("--top-n", type=int, default=300, show_default=True,
                     help="AS-norm: the best-scoring cohort speakers per trial side."),
        click.option("--p-target", default="0.01,0.05", show_default=True, metavar="P[,P...]",
                     help="Target priors for minDCF and actual DCF."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def echo_warnings(warnings: list[str]) -> None:
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


@click.command()
@store_argument
@click.argument("trials", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@model_option
@norm_options
@click.option("--scores", "scores", type=click.Path(), default=None, metavar="FILE|DIR",
              help="Write `<enroll> <test> <score> <target|nontarget>` per trial (a folder for several lists/norms).")
@click.option("--scores-out", "scores_out", type=click.Path(), default=None, hidden=True)
@click.option("--plot", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Write DET curves and score histograms (PNG + SVG) here; needs embstore[plot].")
@click.option("--c-miss", type=float, default=1.0, show_default=True, help="Cost of a miss (DCF).")
@click.option("--c-fa", type=float, default=1.0, show_default=True, help="Cost of a false alarm (DCF).")
@json_option
@library_errors
@exit_status_documented
def score(store, trials, model, norm, mean_from, cohort, top_n, p_target, scores, scores_out, plot, c_miss, c_fa,
          as_json):
    """Score the trial lists TRIALS with the store's embeddings: EER, minDCF at each
    --p-target, and the actual DCF at the EER threshold; one row per list and norm.

    \b
    A trial list has one trial per line, either order:
        utt1 utt2 target|nontarget        (Kaldi; 1/0 works too)
        1 id10270/x/00001.wav id10309/y/00002.wav   (VoxCeleb: label first)
    An id is an item id or its unique ending (a file stem, with or without
    extension). Trials with an id missing from the store (or not embedded)
    are skipped, counted and listed.

    \b
    Normalisation follows WeSpeaker's recipe, so numbers compare with published ones:
      none    cosine of the two sides
      mean    cosine after subtracting the --mean-from mean (needs --mean-from)
      snorm   0.5 ((s - mu_e)/sd_e + (s - mu_t)/sd_t), each side's mean and
              std over all --cohort speakers
      asnorm  the same over each side's --top-n best cohort speakers
    SEL is a file of item ids (one per line), dataset:NAME or speakers:FILE.

    --json prints a list, one object per list and norm (eer, min_dcf, act_dcf, ...).

    \b
    Examples:
        embstore score store/ ../shared/data/librispeech-test-other/trials.txt
        embstore score store/ vox1_O.txt vox1_E.txt vox1_H.txt --norm none,asnorm \\
            --mean-from dataset:vox2_dev --cohort dataset:vox2_dev --top-n 300
        embstore score store/ trials.txt --norm snorm --cohort speakers:cohort.txt \\
            --scores scores/ --plot plots/ --json
    """
    with open_store(store) as st:
        report = st.score(
            list(trials), model=model, norm=list(norm), mean_from=mean_from, cohort=cohort, top_n=top_n,
            p_target=p_target, c_miss=c_miss, c_fa=c_fa, scores=scores or scores_out, plot=plot,
        )
    echo_warnings(report.warnings)
    if as_json:
        echo_json(report.as_json())
    else:
        _echo_results(report, plot)
    conclude(report.outcome, store)


def _echo_results(report: ScoreReport, plot: str | None) -> None:
    from embstore.eval.scoring import result_table

    headers, rows = result_table(report.results, report.options["p_targets"])
    click.echo(f"model      {report.model}")
    for key in ("mean_from", "cohort", "top_n"):
        if report.options.get(key) is not None:
            click.echo(f"{key.replace('_', '-'):<10} {report.options[key]}")
    echo_table([dict(zip(headers, r)) for r in rows], headers)
    if report.score_files:
        click.echo(f"scores     {', '.join(report.score_files)}")
    if report.plots:
        click.echo(f"plots      {len(report.plots)} files in {plot}")


def register(cli: click.Group) -> None:
    cli.add_command(score)
