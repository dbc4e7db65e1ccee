"""`embstore speakers`, `speaker`, `similar`, `centroids`: questions answered from the store."""

from __future__ import annotations

from typing import Callable

import click

from embstore.cli.common import by_option, echo_json, echo_table, json_option, library_errors, model_option, open_store, store_argument



def embeddings_of(argument: str, metavar: str) -> Callable[[Callable], click.Command]:
    """A command listing the embeddings of one thing: STORE <argument>, --model,
    --vectors, --json, library errors as one line."""
    def decorate(fn: Callable) -> click.Command:
        fn = library_errors(fn)
        fn = json_option(fn)
        fn = click.option("--vectors", is_flag=True, help="Include the embeddings (lists of floats in --json).")(fn)
        fn = model_option(fn)
        fn = click.argument(argument, metavar=metavar)(fn)
        return click.command()(store_argument(fn))

    return decorate


@click.command()
@store_argument
@model_option
@by_option
@json_option
@library_errors
def speakers(store, model, by, as_json):
    """Speakers in STORE with their item counts and how many items are embedded.

    The done count is for the chosen model, or the only one; with several
    models and no --model, one count per model.

    \b
    Examples:
        embstore speakers store/
        embstore speakers store/ --json | jq '.[] | select(.done < .items)'
        embstore speakers store/ --by cluster    # after `embstore cluster`
    """
    with open_store(store) as st:
        rows = st.speakers(model=model, by=by)
    if as_json:
        echo_json(rows)
        return
    table = []
    for r in rows:
        done = r.get("done", "")
        if isinstance(done, dict):
            done = ", ".join(f"{k}: {v}" for k, v in done.items())
        table.append({"speaker": r["speaker"], "datasets": ",".join(r["datasets"]), "items": r["items"], "done": done})
    echo_table(table, ["speaker", "datasets", "items", "done"])


@embeddings_of("speaker_id", "ID")
def speaker(store, speaker_id, model, vectors, as_json):
    """One speaker's items: id, dataset, audio path, whether embedded.

    --json prints a list of objects (id, dataset, path, start, end, duration,
    done); with --vectors each also has "embedding" (null when not done yet).

    \b
    Examples:
        embstore speaker store/ id10001
        embstore speaker store/ id10001 --json --vectors > id10001.json
    """
    with open_store(store) as st:
        items = st.speaker_items(speaker_id, model=model, vectors=vectors)
    if as_json:
        for item in items:
            if item.get("embedding") is not None:
                item["embedding"] = [float(x) for x in item["embedding"]]
        echo_json(items)
        return
    table = []
    for item in items:
        row = {"id": item["id"], "dataset": item["dataset"], "path": item["path"], "done": item.get("done", "")}
        if vectors:
            vec = item.get("embedding")
            row["embedding"] = "" if vec is None else "[" + ", ".join(f"{x:.3f}" for x in vec[:4]) + ", ...]"
        table.append(row)
    echo_table(table, ["id", "dataset", "done", "path"] + (["embedding"] if vectors else []))


@click.command()
@store_argument
@click.argument("item_id", metavar="[ITEM_ID]", required=False)
@click.option("--audio", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Embed this audio file with the store's model and search for it.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="How many neighbours.")
@click.option("--min-score", type=click.FloatRange(-1.0, 1.0), default=None, metavar="T",
              help="Every item at or above cosine T instead of the K best (paged: --limit, --offset).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=None,
              help="With --min-score: items per page  [default: 1000].")
@click.option("--offset", type=click.IntRange(min=0), default=0, help="With --min-score: skip this many items.")
@click.option("--exact", is_flag=True, help="Score every row (the full scan), never the ANN index.")
@model_option
@json_option
@library_errors
def similar(store, item_id, audio, k, min_score, limit, offset, exact, model, as_json):
    """The K items whose embeddings are closest (cosine) to an item or an audio file.

    ITEM_ID is an item id or its unique ending (a file stem, with or without
    extension). The item itself is left out; items with identical audio are
    not. The first search builds STORE/cache (normalised rows, safe to delete).
    With --audio and a window model (--model NAME+w1.5:0.75+silero), the best
    windows with their times: where else this voice speaks.

    When the model has an ANN index (`embstore index`; built by the first
    search from 2,000,000 rows on) its candidates are re-ranked exactly: the
    scores are exact cosines, and --json says how they were found on every
    row ("index": "flat" or e.g. "ivf2048,sq8"; "exact": true when every row
    was scored). --exact forces the full scan.

    \b
    Examples:
        embstore similar store/ vox1/id10001/1zcIwhmdeo4/00001
        embstore similar store/ 1688-142285-0000 -k 5 --json
        embstore similar store/ 1688-142285-0000 --min-score 0.7 --limit 100 --offset 100
        embstore similar store/ 1688-142285-0000 --exact
        embstore similar store/ --audio query.wav
        embstore similar store/ --audio query.wav --model campplus-zh-en-common+w1.5:0.75+silero
    """
    if (item_id is None) == (audio is None):
        raise click.UsageError("give either ITEM_ID or --audio FILE")
    if min_score is None and (limit is not None or offset):
        raise click.UsageError("--limit and --offset page a range query: give --min-score T")
    page = (limit or 1000) if min_score is not None else None
    with open_store(store) as st:
        # one more than the page: whether a next page exists, without counting them all
        found = st.similar(item_id=item_id, audio=audio, k=k, model=model, exact=exact, min_score=min_score,
                           offset=offset, limit=None if page is None else min(page + 1, 10_000))
    more = page is not None and len(found) > page
    found = found[:page] if page is not None else found
    if as_json:
        echo_json(found)
    else:
        timed = bool(found) and "start" in found[0]
        echo_table(
            [{"rank": offset + n + 1, "score": f"{r['score']:.4f}", "speaker": r["speaker"], "id": r["id"],
              "time": f"{r['start']:.2f}-{r['end']:.2f}" if timed else ""} for n, r in enumerate(found)],
            ["rank", "score", "speaker", "id"] + (["time"] if timed else []),
        )
    if more:
        click.echo(f"more at or above {min_score}: --offset {offset + page} for the next page", err=True)


@embeddings_of("item_id", "ITEM_ID")
def windows(store, item_id, model, vectors, as_json):
    """One item's windows from a window model: start, end (seconds), and embedding.

    A window model comes from `embstore extract STORE --windows 1.5:0.75`; a
    window shorter than the spec's (the end of a speech region) is marked short.

    \b
    Examples:
        embstore windows store/ 1688-142285-0000
        embstore windows store/ 1688-142285-0000 --json --vectors > windows.json
    """
    import numpy as np

    with open_store(store) as st:
        starts, ends, matrix = st.windows(item_id, model=model)
        m = st.manifest.resolve_model(model, kind="windows")
        spec = m.window_spec["window"]
    short = (ends - starts) < spec - 5e-4
    if as_json:
        out = [{"start": float(a), "end": float(b), "short": bool(c)} for a, b, c in zip(starts, ends, short)]
        if vectors:
            for entry, row in zip(out, matrix):
                entry["embedding"] = [float(x) for x in row]
        echo_json(out)
        return
    norms = np.linalg.norm(matrix, axis=1)
    echo_table(
        [{"window": n, "start": f"{a:.3f}", "end": f"{b:.3f}", "short": "short" if c else "", "norm": f"{x:.3f}"}
         for n, (a, b, c, x) in enumerate(zip(starts, ends, short, norms))],
        ["window", "start", "end", "short", "norm"],
    )


@click.command()
@store_argument
@model_option
@by_option
@json_option
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              help="Write speakers, centroids, counts to this .npz file.")
@library_errors
def centroids(store, model, by, as_json, out_file):
    """Per-speaker centroid: the mean of the speaker's L2-normalised embeddings.

    Not re-normalised: a centroid's norm (<= 1) says how consistent the
    speaker's embeddings are. --out writes an .npz with arrays `speakers`
    (str), `centroids` (float32 [n, dim]) and `counts` (items per speaker);
    --json prints [{"speaker", "items", "centroid": [...]}].

    \b
    Examples:
        embstore centroids store/ --out centroids.npz
        embstore centroids store/ --json > centroids.json
        embstore centroids store/               # speakers, item counts, norms
        embstore centroids store/ --by cluster --out clusters.npz
    """
    import numpy as np

    from embstore.query import centroid_table

    with open_store(store) as st:
        names, matrix, counts = centroid_table(st.manifest, model, by=by)
    if out_file:
        with open(out_file, "wb") as f:  # an open file: np.savez would otherwise append .npz
            np.savez(f, speakers=np.array(names, dtype=str), centroids=matrix, counts=counts)
    if as_json:
        echo_json([
            {"speaker": s, "items": int(n), "centroid": [float(x) for x in v]} for s, n, v in zip(names, counts, matrix)
        ])
        return
    if out_file:
        click.echo(f"{len(names)} speakers x {matrix.shape[1]} -> {out_file}")
        return
    norms = np.linalg.norm(matrix, axis=1) if len(names) else []
    echo_table(
        [{"speaker": s, "items": int(n), "norm": f"{x:.3f}"} for s, n, x in zip(names, counts, norms)],
        ["speaker", "items", "norm"],
    )


def register(cli: click.Group) -> None:
    for command in (speakers, speaker, similar, windows, centroids):
        cli.add_command(command)
