"""The `embstore` command: a thin click layer over the library.

Command modules import nothing heavy at load time (no torch, zarr or sqlite-utils),
so `embstore --help` stays instant.
"""

from __future__ import annotations

import click

from embstore import __version__
from embstore.cli import cluster, diarize, export, extract, models, outliers, query, report, scan, score, search, status, verify


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embstore")
def cli() -> None:
    """Speaker embeddings for large speech corpora: scan once, extract exactly once
    (resumable, on all GPUs), query from one store.

    \b
    Typical session:
        embstore scan store/ /data/voxceleb
        embstore extract store/ --gpus 0,1
        embstore status store/
        embstore export-pkl store/ embeddings/
    """


for module in (scan, extract, status, query, search, score, report, outliers, export, verify, diarize, cluster, models):
    module.register(cli)


def main() -> None:
    cli()
