"""Loading claimed items ahead of the model: read, hash, decode, resample, features.

One claim is loaded in two passes over the loader pool: first every item's bytes are
hashed (a file's, or a dataset row's audio bytes: `embstore.audio.io` addresses), then
one dedup lookup asks the manifest which of those audio spans already have a row; only
the rest are decoded and turned into features. Every failure is the item's own, with
the stage it happened in, except a problem of the machine (`EnvironmentProblem`): that
stops the worker instead.
"""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np

from embstore.audio.io import content_hash, parse_address
from embstore.errors import AudioError, EnvironmentProblem, ItemCutFailed
from embstore.extract.batching import Loaded
from embstore.extract.client import ManifestClient
from embstore.segments.policy import EAGER_WINDOWS, Cutting
from embstore.extract.faults import crash_if_poison
from embstore.extract.messages import ClaimedTask
from embstore.models.base import Encoder
from embstore.segments.vad import Region
from embstore.segments.windows import WindowPlan


def hash_item(task: ClaimedTask) -> Loaded:
    """The item's content hash; a dataset row's (`SHARD#row=N`) is its audio bytes',
    read from the one row group that holds it (cached for the decode that follows)."""
    try:
        return Loaded(task, content_hash=content_hash(task.path))
    except AudioError as exc:  # a dataset row that cannot be read: a shard cut or rewritten since
        return Loaded(task, error=("read", str(exc)))
    except FileNotFoundError:
        return Loaded(task, error=("read", "file not found (removed since scan?)"))
    except IsADirectoryError:
        return Loaded(task, error=("read", "is a directory, not an audio file"))
    except OSError as exc:
        return Loaded(task, error=("read", f"cannot read: {exc.strerror or exc}"))


def decode_item(encoder: Encoder, item: Loaded, device_features: bool = False, cutting: Cutting | None = None,
                known: list[Region] | None = None) -> Loaded:
    """Samples (and, unless features run on the device, features) of a hashed item, cut
    (speech only, or windows) when the run cuts; `known`: its stored speech regions."""
    task = item.task
    crash_if_poison(task.path)
    try:
        wav = encoder.load(task.path, task.start, task.end)
    except AudioError as exc:
        return _failed(item, "decode", str(exc))
    except Exception as exc:
        return _failed(item, "decode", f"{type(exc).__name__}: {exc}")
    if wav.size == 0:
        return _failed(item, "decode", "no audio samples")
    if not wav.any():
        # no speaker to embed: any model would return NaN or a meaningless constant vector
        return _failed(item, "decode", "silent audio (all samples are zero)")
    if cutting is not None:
        try:
            cut = cutting.cut(encoder, wav, known)
        except ItemCutFailed as exc:
            return _failed(item, exc.stage, exc.reason)
        except EnvironmentProblem:
            raise  # the machine's fault, not the item's: the worker stops and says why
        except ImportError as exc:  # a package the cutting needs went missing or broke
            raise EnvironmentProblem(f"cutting needs a package that does not load: {type(exc).__name__}: {exc}") from None
        except Exception as exc:
            return _failed(item, "vad", f"{type(exc).__name__}: {exc}")
        item.speech, wav = cut.speech, cut.wav
        if cut.plan is not None:
            return _window_features(encoder, cutting, item, wav, cut.plan)
    if device_features:
        if encoder.feature_length(len(wav)) <= 0:
            return _failed(item, "features", "too short for this model (no feature frames)")
        item.wav = wav
        return item
    try:
        feats = encoder.features(wav)
    except Exception as exc:
        return _failed(item, "features", f"{type(exc).__name__}: {exc}")
    if feats is None or len(feats) == 0:
        return _failed(item, "features", "too short for this model (no feature frames)")
    if not np.isfinite(feats).all():
        return _failed(item, "features", "non-finite features")
    item.feats = feats
    return item


def _window_features(encoder: Encoder, cutting: Cutting, item: Loaded, wav: np.ndarray, plan: WindowPlan) -> Loaded:
    """A window model's item: its windows' features now, or (a long item) its samples,
    featurised block by block on the compute side."""
    item.plan = plan
    if len(plan) > EAGER_WINDOWS:
        item.wav = wav
        return item
    try:
        item.feats = cutting.embedder(encoder).window_features(cutting.window_pieces(encoder, wav, plan))
    except Exception as exc:
        return _failed(item, "features", f"{type(exc).__name__}: {exc}")
    return item


def _failed(item: Loaded, stage: str, message: str) -> Loaded:
    item.error = (stage, message)
    return item


def load_claim(
    pool: Executor, encoder: Encoder, client: ManifestClient, claimed: list[ClaimedTask], device_features: bool,
    cutting: Cutting | None = None,
) -> list[Loaded]:
    """Every claimed item loaded, reused from a done twin (dedup), or failed; in claim
    order, read in `read_order`."""
    hashed = list(pool.map(hash_item, read_order(claimed)))
    keys = [(x.content_hash, x.task.start, x.task.end) for x in hashed if x.content_hash]
    rows = client.dedup_rows(keys) if keys else {}
    todo = []
    for x in hashed:
        if x.content_hash is not None:
            x.dup_row = rows.get((x.content_hash, x.task.start, x.task.end))
        if x.error is None and x.dup_row is None:
            todo.append(x)
    known: dict[int, list[Region]] = {}
    if cutting is not None and cutting.vad.method != "none" and todo:
        known = client.speech_regions([x.task.item_id for x in todo], cutting.vad_key)
    list(pool.map(lambda x: decode_item(encoder, x, device_features, cutting, known.get(x.task.item_id)), todo))
    position = {task.task_id: k for k, task in enumerate(claimed)}
    return sorted(hashed, key=lambda x: position[x.task.task_id])


def read_order(claimed: list[ClaimedTask]) -> list[ClaimedTask]:
    """Dataset rows (`SHARD#row=N`) by shard and row, then the other items as claimed: a
    claim in length order (equal batching) mixes shards and rows, and read so it would
    evict the row groups `embstore.audio.io` caches before their next row is read."""
    def key(k: int) -> tuple:
        address = parse_address(claimed[k].path)
        if address is None or address[1] is None:
            return (1, k)
        return (0, address[0], address[1])

    return [claimed[k] for k in sorted(range(len(claimed)), key=key)]
