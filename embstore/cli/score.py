"""`embstore score`: EER and minDCF of a trial list, scored from the store."""

from __future__ import annotations

import click

from embstore.cli.common import echo_json, json_option, library_errors, model_option, open_store, store_argument


@click.command()
@store_argument
@click.argument("trials", type=click.Path(exists=True, dir_okay=False))
@model_option
@click.option("--scores-out", type=click.Path(dir_okay=False), default=None,
              help="Write `id1 id2 score target|nontarget` per scored trial.")
@click.option("--p-target", type=float, default=0.01, show_default=True, help="Prior of a target trial (minDCF).")
@click.option("--c-miss", type=float, default=1.0, show_default=True, help="Cost of a miss (minDCF).")
@click.option("--c-fa", type=float, default=1.0, show_default=True, help="Cost of a false alarm (minDCF).")
@json_option
@library_errors
def score(store, trials, model, scores_out, p_target, c_miss, c_fa, as_json):
    """Cosine-score the trials in TRIALS with the store's embeddings: EER, minDCF.

    \b
    TRIALS has one trial per line, either order:
        utt1 utt2 target|nontarget        (Kaldi; 1/0 works too)
        1 id10270/x/00001.wav id10309/y/00002.wav   (VoxCeleb: label first)
    An id is an item id or its unique ending (a file stem, with or without
    extension). Trials with an id missing from the store (or not embedded)
    are skipped and counted as missing.

    --json prints {"eer": fraction, "min_dcf": ..., "trials": n, "missing": n}.

    \b
    Examples:
        embstore score store/ ../shared/data/librispeech-test-other/trials.txt
        embstore score store/ voxceleb1_test.txt --json --scores-out scores.txt
    """
    with open_store(store) as st:
        result = st.score(trials, model=model, p_target=p_target, c_miss=c_miss, c_fa=c_fa, scores_out=scores_out)
    if as_json:
        echo_json({key: result[key] for key in ("eer", "min_dcf", "trials", "missing")})
        return
    click.echo(f"model     {result['model']}")
    click.echo(
        f"trials    {result['trials']} scored ({result['targets']} target, {result['nontargets']} nontarget),"
        f" {result['missing']} missing"
    )
    click.echo(f"EER       {100 * result['eer']:.2f}%")
    click.echo(f"minDCF    {result['min_dcf']:.4f} (p_target={p_target}, c_miss={c_miss}, c_fa={c_fa})")


def register(cli: click.Group) -> None:
    cli.add_command(score)
