"""`embstore verify`."""

from __future__ import annotations

import sys

import click

from embstore.cli.common import echo_json, json_option, library_errors, model_option, open_store, store_argument

EXIT_PROBLEMS = 1


@click.command()
@store_argument
@click.option("--deep", type=click.IntRange(0), default=0, show_default=True, metavar="N",
              help="Also embed N random done items again with the model and compare.")
@click.option("--seed", type=int, default=None, help="Seed for picking the --deep items (default: random).")
@model_option
@json_option
@library_errors
def verify(store, deep, seed, model, as_json):
    """Check that STORE's manifest and its embedding arrays agree.

    Reads every chunk under the committed rows and checks that each done item
    points to a readable, finite row computed for it (or for identical audio).
    Safe while an extract runs. Exit status: 0 consistent, 1 problems found.

    \b
    Examples:
        embstore verify store/
        embstore verify store/ --deep 20            # recompute 20 random items
        embstore verify store/ --json | jq .problems
        embstore verify store/ --model campplus-zh-en-common
    """
    with open_store(store) as st:
        report = st.verify(model=model, deep=deep, seed=seed)
    if as_json:
        echo_json(report.as_dict())
    else:
        for name, info in report.models.items():
            line = (f"{name}: {info.get('done', 0)} done items, {info['rows']} committed rows"
                    f", {info.get('chunks_checked', 0)} chunks read, {info.get('shared_rows', 0)} shared (dedup) rows")
            d = info.get("deep")
            if d:
                line += f"; recomputed {d['checked']}, min cosine {d['min_cosine']}"
            click.echo(line)
        for w in report.warnings:
            click.echo(f"warning: {_where(w)}{w.message}{_examples(w)}")
        for p in report.problems:
            click.echo(f"PROBLEM: {_where(p)}{p.message}{_examples(p)}")
        click.echo(f"ok: the store is consistent ({report.seconds:.1f}s)" if report.ok else
                   f"{len(report.problems)} problem(s) found ({report.seconds:.1f}s)")
    if not report.ok:
        sys.exit(EXIT_PROBLEMS)


def _where(finding) -> str:
    return f"[{finding.model}] " if finding.model else ""


def _examples(finding) -> str:
    if not finding.examples or finding.check.startswith("chunk"):
        return ""  # the message already names the chunk
    shown = ", ".join(str(e) for e in finding.examples[:3])
    more = f" (+{finding.count - 3} more)" if finding.count > 3 else ""
    return f": {shown}{more}"


def register(cli: click.Group) -> None:
    cli.add_command(verify)
