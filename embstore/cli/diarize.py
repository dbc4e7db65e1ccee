"""`embstore diarize`."""

from __future__ import annotations

import sys

import click

from embstore.cli.common import (
    conclude, exit_status_documented, echo_json, echo_table, json_option, library_errors, model_option, open_store,
    store_argument,
)


@click.command()
@store_argument
@model_option
@click.option("--num-speakers", type=int, default=None, help="Speakers per item, when known.")
@click.option("--max-speakers", type=int, default=None, help="At most this many speakers per item (eigengap below it).")
@click.option("--method", type=click.Choice(["spectral", "ahc"]), default="spectral", show_default=True,
              help="spectral: eigengap speaker count (WeSpeaker, 3D-Speaker); ahc: average linkage at a threshold.")
@click.option("--windows", default="1.5:0.75", show_default=True, metavar="WINDOW:SHIFT",
              help="Windows to extract where missing (without --model).")
@click.option("--vad", type=click.Choice(["silero", "webrtc"]), default="silero", show_default=True,
              help="VAD for the windows (without --model).")
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Extraction processes.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N for the extraction.")
@click.option("--rttm", "rttm_out", type=click.Path(dir_okay=False), default=None,
              help="Write one RTTM file for all items ('-' for stdout).")
@json_option
@library_errors
@exit_status_documented
def diarize(store, model, num_speakers, max_speakers, method, windows, vad, workers, device, rttm_out, as_json):
    """Who spoke when in each item of STORE, as RTTM.

    Window embeddings are extracted first where missing (resumable, like
    `embstore extract --windows`), then each item's windows are clustered and
    merged into speaker turns. Results are stored: a second call is instant.

    \b
    Examples:
        embstore diarize store/ --rttm all.rttm
        embstore diarize store/ --num-speakers 2 --rttm - | head
        embstore diarize store/ --max-speakers 4 --method ahc --json
    """
    from embstore.diarize.rttm import write_rttm

    with open_store(store) as st:
        report = st.diarize(model=model, num_speakers=num_speakers, max_speakers=max_speakers, method=method,
                            windows=windows, vad=vad, rttm=rttm_out is not None, workers=workers, device=device,
                            progress=not as_json and rttm_out != "-")
    segments = report.segments
    if rttm_out == "-":
        write_rttm(sys.stdout, segments)
    elif rttm_out:
        write_rttm(rttm_out, segments)
    if as_json:
        echo_json(report.as_json())
    elif rttm_out != "-" and segments:
        echo_table([{"id": k, "speakers": report.speakers[k], "turns": len(v)} for k, v in segments.items()],
                   ["id", "speakers", "turns"])
    if not as_json and rttm_out != "-" and segments:
        click.echo(f"{report.items} items ({report.computed} diarized now, {report.reused} stored) with "
                   f"{report.model}" + (f" -> {rttm_out}" if rttm_out else ""), err=True)
    conclude(report.outcome, store)


def register(cli: click.Group) -> None:
    cli.add_command(diarize)
