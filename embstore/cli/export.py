"""`embstore export-pkl`, `export-kaldi`, `export-npy`, `export-lhotse`, `export-parquet`:
embeddings out of the store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import click

from embstore.cli.common import (
    by_option, conclude, exit_status_documented,
    echo_json, json_option, library_errors, model_option, open_store, stderr_is_tty, store_argument,
)

if TYPE_CHECKING:
    from embstore.export.files import MatrixExport
    from embstore.export.parquet import ParquetExport

out_argument = click.argument("out", type=click.Path(file_okay=False))


@click.command("export-pkl")
@store_argument
@out_argument
@model_option
@click.option("--dataset", default=None, help="Only this dataset's items.")
@click.option("--speaker", default=None, help="Only this speaker's items.")
@click.option(
    "--format", "fmt", type=click.Choice(["dict", "array"]), default="dict", show_default=True,
    help="dict: embedding + metadata; array: the bare float32 array.",
)
@click.option("--threads", "--workers", "threads", type=int, default=None,
              help="Threads writing files (default: 2 per CPU, at most 16); --workers is its 0.1 name.")
@click.option("--force", is_flag=True, help="Rewrite every file, even those already up to date.")
@by_option
@json_option
@library_errors
@exit_status_documented
def export_pkl(store, out, model, dataset, speaker, fmt, threads, force, by, as_json):
    """Write one pickle per embedded item: OUT/<dataset>/<speaker>/<stem>.pkl.

    The layout of the usual extraction scripts, so code reading their output
    keeps working. Where two items of one speaker share a stem (VoxCeleb's
    id/video/00001.wav), both keep their folders below the speaker
    (OUT/<dataset>/<speaker>/<video>/00001.pkl); nothing is overwritten.
    Kaldi items are named by their utterance id. Names are sanitised, so
    nothing is ever written outside OUT.

    \b
    --format dict (default) pickles a dict:
        embedding    float32 numpy array [dim]
        id           item id in the store
        speaker, dataset
        cluster      pseudo-speaker label of `embstore cluster` (or None)
        path         source audio file; start, end: seconds (None = whole file)
        model, fingerprint
    --format array pickles the bare float32 array.

    Incremental: OUT/.embstore-export.db remembers what was written, so a
    second export writes only new or changed items and deletes the files of
    items that left the store.

    --by cluster names the folders by pseudo-speaker instead
    (OUT/<dataset>/<cluster>/<stem>.pkl) and leaves unclustered items out.

    \b
    Examples:
        embstore export-pkl store/ embeddings/
        embstore export-pkl store/ by-cluster/ --dataset podcasts --by cluster
        embstore export-pkl store/ embeddings/ --speaker id10001 --format array
        python -c "import pickle; print(pickle.load(open('embeddings/libri/1688/1688-142285-0000.pkl','rb'))['embedding'].shape)"
    """
    with open_store(store) as st:
        report = st.export_pkl(
            out, model=model, dataset=dataset, speaker=speaker, fmt=fmt, threads=threads, force=force, by=by,
            progress=stderr_is_tty() and not as_json,
        )
    if as_json:
        echo_json(report.as_dict())
    else:
        click.echo(
            f"{report.items} items: wrote {report.written} files ({report.files_per_second:.0f} files/s),"
            f" {report.unchanged} unchanged, {report.moved} moved, {report.removed} removed"
            + (f", {report.left_out} unclustered left out" if report.left_out else "")
            + f" -> {report.out} ({report.model}, {report.seconds:.1f}s)"
        )
    conclude(report.outcome, store)


def matrix_export_command(name: str) -> Callable[[Callable], click.Command]:
    """`export-kaldi` and `export-npy`: STORE OUT, --model, --by, --json."""
    def decorate(fn: Callable) -> click.Command:
        for decorator in (exit_status_documented, library_errors, json_option, by_option, model_option, out_argument,
                          store_argument):
            fn = decorator(fn)
        return click.command(name)(fn)

    return decorate


@matrix_export_command("export-kaldi")
@click.option("--matrix", is_flag=True,
              help="Write each vector as a 1 x dim matrix (Lhotse's Kaldi reader, copy-matrix) instead of a vector.")
def export_kaldi(store, out, model, by, matrix, as_json):
    """Write Kaldi tables: xvector.ark + xvector.scp, utt2spk, spk2utt in OUT.

    Keys are the store's item ids (whitespace replaced by _), sorted; the
    vectors are float32. Read them with kaldiio.load_scp('OUT/xvector.scp') or
    any Kaldi tool (e.g. ivector-mean ark:OUT/spk2utt scp:OUT/xvector.scp ...).
    A window model writes one vector per window, keyed by Kaldi subsegment
    ids <item>-<start_ms:07d>-<end_ms:07d>, and a segments file.
    --matrix writes 1 x dim matrices, which Lhotse's KaldiReader and Kaldi's
    matrix tools load (WeSpeaker and ivector-* tools read the default vectors).

    \b
    Examples:
        embstore export-kaldi store/ exp/xvectors
        embstore export-kaldi store/ exp/xvector-matrices --matrix
        embstore export-kaldi store/ exp/xvectors --model campplus-zh-en-common
        embstore export-kaldi store/ exp/subsegments --model campplus-zh-en-common+w1.5:0.75+silero
    """
    def echo(info: MatrixExport) -> None:
        what = f"{info.windows} windows of {info.items} items" if info.windows is not None else f"{info.items} items"
        click.echo(f"{what} of {info.speakers} speakers -> {info.out} ({', '.join(info.files)})")

    _export(store, as_json, lambda st: st.export_kaldi(out, model=model, by=by, matrix=matrix), echo)


@matrix_export_command("export-npy")
def export_npy(store, out, model, by, as_json):
    """Write one matrix: OUT/embeddings.npy (float32 [items, dim]) + row labels.

    \b
    OUT/embeddings.npy   float32 [n, dim], one row per embedded item
    OUT/ids.txt          item id of row i on line i
    OUT/speakers.txt     speaker of row i on line i
    OUT/datasets.txt     dataset of row i on line i
    OUT/export.json      model name, spec, fingerprint, dim, item count
    (a backslash or newline inside a name is written as \\\\ or \\n)

    \b
    Examples:
        embstore export-npy store/ matrix/
        python -c "import numpy as np; print(np.load('matrix/embeddings.npy', mmap_mode='r').shape)"
    """
    def echo(info: MatrixExport) -> None:
        what = f"{info.windows} windows of {info.items} items" if info.windows is not None else f"{info.items}"
        click.echo(f"{what} x {info.dim} float32 -> {info.out}/embeddings.npy (+ {', '.join(info.files[1:])})")

    _export(store, as_json, lambda st: st.export_npy(out, model=model, by=by), echo)


@click.command("export-lhotse")
@store_argument
@out_argument
@model_option
@json_option
@library_errors
@exit_status_documented
def export_lhotse(store, out, model, as_json):
    """Write Lhotse cuts with embeddings: OUT/cuts.jsonl.gz + OUT/embeddings-<random>.h5.

    One cut per embedded item, with the custom field `embedding` (a float32
    [dim] array in OUT/embeddings-<random>.h5, written by Lhotse's
    NumpyHdf5Writer). Each export writes a new HDF5 file, then replaces the
    cuts, then deletes the earlier HDF5 file: a reader never opens cuts that
    name a missing file.
    Items scanned with --lhotse keep their manifest's recording, supervision
    and custom fields; other items get a cut of their file (a dataset row: a
    cut without recording, its address in the custom field `source`). Cut
    ids are item ids; a window model writes one cut per window, id
    <item>-<start_ms:07d>-<end_ms:07d>. The cuts name the HDF5 file by its
    absolute path. Reading needs Lhotse only.

    \b
    Examples:
        embstore export-lhotse store/ exp/lhotse
        python -c "from lhotse import CutSet; c = next(iter(CutSet.from_file('exp/lhotse/cuts.jsonl.gz'))); print(c.id, c.load_embedding().shape)"
    """
    def echo(info: MatrixExport) -> None:
        what = f"{info.windows} windows of {info.items} items" if info.windows is not None else f"{info.items} items"
        click.echo(f"{what} -> {info.out}/cuts.jsonl.gz (embeddings in {info.out}/{info.files[-1]}, {info.dim}-d float32)")

    _export(store, as_json, lambda st: st.export_lhotse(out, model=model), echo)


@click.command("export-parquet")
@store_argument
@out_argument
@model_option
@click.option("--force", is_flag=True, help="Rewrite every shard, even those already up to date.")
@json_option
@library_errors
@exit_status_documented
def export_parquet(store, out, model, force, as_json):
    """Write Parquet shards: OUT/part-NNNNN.parquet.

    \b
    Columns: id, speaker, dataset, path (source audio or SHARD#row=N),
    start, end (seconds; null = file start/end), embedding
    (fixed_size_list<float32>[dim]), cluster (when set); a window model
    writes one row per window, with `item` and the window's start/end.
    The schema metadata holds the model (key `embstore`) and the `datasets`
    features (key `huggingface`). Incremental: only shards whose items
    changed are rewritten (OUT/.embstore-export.json).

    \b
    Examples:
        embstore export-parquet store/ exp/parquet
        python -c "import datasets; print(datasets.Dataset.from_parquet('exp/parquet/*.parquet'))"
        duckdb -c "SELECT speaker, count(*) FROM 'exp/parquet/*.parquet' GROUP BY speaker"
    """
    def echo(info: ParquetExport) -> None:
        rows = f"{info.rows} rows of {info.items} items" if info.rows != info.items else f"{info.items} items"
        click.echo(f"{rows} x {info.dim} float32 -> {info.out} ({len(info.files)} shards: {info.written} written,"
                   f" {info.unchanged} unchanged, {info.removed} removed, {info.seconds:.1f}s)")

    _export(store, as_json, lambda st: st.export_parquet(out, model=model, force=force), echo)


def _export(store: str, as_json: bool, run: Callable[[Any], Any], echo: Callable[[Any], None]) -> None:
    """Run one export, print its report (`echo`, or JSON) and end as its outcome says."""
    with open_store(store) as st:
        info = run(st)
    if as_json:
        echo_json(info.as_dict())
    else:
        echo(info)
    conclude(info.outcome, store)


def register(cli: click.Group) -> None:
    cli.add_command(export_pkl)
    cli.add_command(export_kaldi)
    cli.add_command(export_npy)
    cli.add_command(export_lhotse)
    cli.add_command(export_parquet)
