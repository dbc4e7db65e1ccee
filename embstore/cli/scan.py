"""`embstore scan`."""

from __future__ import annotations

import click

from embstore.cli.common import echo_json, json_option, library_errors, open_store, store_argument


@click.command()
@store_argument
@click.argument("roots", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--layout", type=click.Choice(["dataset", "speaker"]), default="dataset", show_default=True,
    help="dataset: ROOT/<dataset>/<speaker>/**/<file>; speaker: ROOT/<speaker>/**/<file> (dataset = ROOT's name).",
)
@click.option("--kaldi", "kaldi", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Kaldi data dir (wav.scp, utt2spk, optional segments). Repeatable.")
@click.option("--list", "lists", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="File with one audio path per line, optionally <TAB>speaker. Repeatable.")
@click.option("--lhotse", "lhotse", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Lhotse manifest: a CutSet, or a RecordingSet (its SupervisionSet beside it is read too). "
                   "One item per supervision. Repeatable.")
@click.option("--hf", "hf", multiple=True, type=click.Path(exists=True),
              help="Hugging Face audio dataset: a Parquet file, a folder of shards, or a save_to_disk folder. "
                   "One item per row. Repeatable.")
@click.option("--dataset", default=None, help="Dataset name of --lhotse/--hf items (default: from their file/folder name).")
@click.option("--id-column", default=None, help="--hf column of item ids (default: id, utt_id, ... or <shard>/<row>).")
@click.option("--speaker-column", default=None,
              help="--hf column of speakers (default: speaker_id, speaker, client_id, ...).")
@click.option("--jobs", type=int, default=None, help="Processes reading headers (default: up to 2).")
@json_option
@library_errors
def scan(store, roots, layout, kaldi, lists, lhotse, hf, dataset, id_column, speaker_column, jobs, as_json):
    """Find audio files and record them (headers only, no decoding) in STORE.

    Rescans are incremental: new files are added, changed files (size or mtime)
    mark their embeddings stale, removed files drop out. Files whose header
    cannot be read are recorded as scan failures (see `embstore errors`).

    A Lhotse manifest gives one item per supervision (id, speaker and span
    from it; a cut without supervisions is one item); sources that are
    commands or URLs are refused per item. An --hf dataset gives one item per
    row, its audio decoded from the row's bytes; an unchanged shard (size,
    mtime) is not read again. Rows and files are counted as "files" below.

    \b
    Examples:
        embstore scan store/ /data/voxceleb          # ROOT/<dataset>/<speaker>/...
        embstore scan store/ /data/vox1 --layout speaker
        embstore scan store/ --kaldi data/train
        embstore scan store/ --list files.txt
        embstore scan store/ --lhotse data/manifests/librispeech_cuts_dev-clean.jsonl.gz
        embstore scan store/ --hf data/voxpopuli/train/ --speaker-column speaker_id
    """
    with open_store(store, create=True) as st:
        report = st.scan(roots, layout=layout, kaldi=kaldi, lists=lists, lhotse=lhotse, hf=hf, dataset=dataset,
                         id_column=id_column, speaker_column=speaker_column, jobs=jobs, progress=not as_json)
    if as_json:
        echo_json(report.as_dict())
        return
    if report.no_changes:
        click.echo(f"no changes ({report.unchanged} files unchanged, {report.seconds:.1f}s)")
    else:
        click.echo(
            f"added {report.added}, changed {report.changed}, removed {report.removed}, "
            f"unchanged {report.unchanged} files; {report.items_added} new items, "
            f"{report.items_stale} stale, {report.items_removed} removed"
            + (f", {report.items_relabelled} relabelled" if report.items_relabelled else "")
            + f" ({report.seconds:.1f}s)"
        )
    if report.failed:
        click.echo(f"{report.failed} files could not be read (see `embstore errors {store}`):", err=True)
        for failure in report.failures[:5]:
            click.echo(f"  {failure['path']}: {failure['error']}", err=True)
    if report.ignored:
        click.echo(f"{report.ignored} audio files outside the {layout} layout were ignored", err=True)


def register(cli: click.Group) -> None:
    cli.add_command(scan)
