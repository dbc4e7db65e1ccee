"""`embstore status` and `embstore errors`: what a store holds and what went wrong."""

from __future__ import annotations

import click

from embstore.cli.common import echo_json, echo_table, json_option, library_errors, model_option, open_store, store_argument


@click.command()
@store_argument
@json_option
@library_errors
def status(store, as_json):
    """What STORE holds: files, items, speakers, audio, and each model's progress.

    \b
    Examples:
        embstore status store/
        embstore status store/ --json | jq .models
    """
    with open_store(store) as st:
        info = st.status()
    if as_json:
        echo_json(info.as_json())
        return
    hours = info.audio_seconds / 3600
    click.echo(f"store      {info.store}")
    click.echo(f"files      {info.files}  ({info.scan_failed} unreadable, {info.removed_files} removed)")
    click.echo(f"items      {info.items}  ({hours:.2f} h of audio)")
    click.echo(f"speakers   {info.speakers} in {info.datasets} datasets")
    for name, counts in info.models.items():
        click.echo(
            f"model      {name} [{counts['batching']} batching, dim {counts['dim']}]: "
            + ", ".join(f"{counts[k]} {k}" for k in ("done", "pending", "claimed", "stale", "failed"))
            + (f"; {counts['diarized']} diarized" if "diarized" in counts else "")
        )
        run = counts.get("last_run")
        if run:
            click.echo(
                f"           last run {run['status']} {run['ended_at']}: {run['batching']} batching on "
                f"{run['runtime'] or 'torch'}, mean batch {run['mean_batch_items']}, "
                f"padding {(run['padding_overhead'] or 0):.1%}, "
                f"{run['x_realtime']}x realtime"
            )
            for node, tally in (run.get("workers_per_node") or {}).items():
                devices = ", ".join(f"{n} x {d}" for d, n in tally["devices"].items())
                lost = f", {tally['lost']} lost" if tally["lost"] else ""
                click.echo(f"           {node}: {tally['workers']} worker(s) on {devices}{lost}")
        for reason, n in list(counts["failures_by_reason"].items())[:5]:
            click.echo(f"           {n} x {reason}")
    for reason, n in list(info.scan_failures_by_reason.items())[:5]:
        click.echo(f"scan       {n} x {reason}")


@click.command()
@store_argument
@model_option
@json_option
@library_errors
def errors(store, model, as_json):
    """Items that failed (and files whose header could not be read), with the reason.

    \b
    Examples:
        embstore errors store/
        embstore errors store/ --json
    """
    with open_store(store) as st:
        report = st.errors(model=model)
    if as_json:
        echo_json(report.as_json())
        return
    echo_table([vars(f) for f in report.failures], ["id", "stage", "error", "path"])


def register(cli: click.Group) -> None:
    cli.add_command(status)
    cli.add_command(errors)
