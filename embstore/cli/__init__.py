"""The `embstore` command: a thin click layer over the library.

Command modules import nothing heavy at load time (no torch, zarr or sqlite-utils),
so `embstore --help` stays instant.
"""

from __future__ import annotations

import click

from embstore import __version__
from embstore.cli import extract as _extract
from embstore.cli import scan as _scan


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


for module in (_scan, _extract):
    module.register(cli)


def _register_optional() -> None:
    # command groups added by later modules register themselves the same way
    import importlib

    for name in ("export", "query", "score", "report", "outliers", "verify"):
        try:
            module = importlib.import_module(f"embstore.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"embstore.cli.{name}":
                raise
            continue
        module.register(cli)


_register_optional()


def main() -> None:
    cli()
