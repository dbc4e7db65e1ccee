"""Model cards: what planning a run needs to know about a model, without loading it.

Loading a model just to learn its fingerprint costs the parent of every run a torch
import, a network build and a hash of every weight (1-2 s before any worker starts). A
card keeps the encoder's description (name, fingerprint, dim, rate, frontend), its
capabilities and its length rule, in the user cache (`$EMBSTORE_CACHE/cards/`), keyed by
everything that could change them: the spec and dtype, the size and mtime of every file
the model is read from, and embstore's own model code. Any change is a different key, so
a card is never stale; the model is loaded again and a new card written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from embstore.models.base import Capabilities, Encoder
from embstore.models.common import abspath
from embstore.models.lengths import LengthRule, rule_from_dict, rule_to_dict
from embstore.models.registry import parse_spec
from embstore.paths import user_cache_dir, write_atomic_text

CARD_VERSION = 1
# the code whose changes can change a description: the model layer and the features
_CODE = Path(__file__).resolve().parents[1]
_CODE_FILES = sorted([*(_CODE / "models").glob("*.py"), _CODE / "audio" / "fbank.py", _CODE / "audio" / "io.py"])


@dataclass(frozen=True)
class ModelCard:
    description: dict[str, Any]
    capabilities: Capabilities
    length_rule: LengthRule

    @property
    def fingerprint(self) -> str:
        return self.description["fingerprint"]

    @property
    def sample_rate(self) -> int:
        return int(self.description["sample_rate"])

    @classmethod
    def of(cls, encoder: Encoder) -> "ModelCard":
        return cls(encoder.describe(), encoder.capabilities, encoder.length_rule)


def _files_of(spec: str) -> list[str] | None:
    """Every file the spec's model is read from; None when that cannot be told (then no card)."""
    source, arg = parse_spec(spec)
    if source.prefix == "openvino":  # openvino:resemblyzer | openvino:[wespeaker:]DIR | openvino:FILE.onnx
        inner = str(arg).removeprefix("wespeaker:")
        return _files_of(inner if inner == "resemblyzer" else f"onnx:{inner}")
    if source.prefix == "resemblyzer":
        found = importlib.util.find_spec("resemblyzer")
        if found is None or not found.submodule_search_locations:
            return None
        folder = list(found.submodule_search_locations)[0]
        return [os.path.join(folder, name) for name in ("pretrained.pt", "hparams.py", "audio.py", "voice_encoder.py")]
    if source.prefix == "wespeaker-hub":
        folder = Path(os.environ.get("WESPEAKER_HOME", Path.home() / ".wespeaker")) / str(arg)
        target = str(folder) if folder.is_dir() else None  # not downloaded yet: the load downloads
    else:
        target = abspath(str(arg))
    if target is None or not os.path.exists(target):
        return None
    if os.path.isdir(target):
        return sorted(os.path.join(d, f) for d, _, fs in os.walk(target) for f in fs)
    # a checkpoint or an ONNX file: its config.yaml sits beside it
    beside = os.path.join(os.path.dirname(target), "config.yaml")
    return [target] + ([beside] if os.path.isfile(beside) else [])


def card_key(spec: str, dtype: str) -> str | None:
    """The card's name for this spec and dtype as they are on disk now; None = no card."""
    files = _files_of(spec)
    if files is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([CARD_VERSION, spec.strip(), dtype]).encode())
    for path in [*files, *map(str, _CODE_FILES)]:
        try:
            st = os.stat(path)
        except OSError:
            return None
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _card_path(key: str) -> Path:
    return user_cache_dir() / "cards" / f"{key}.json"


def lookup(spec: str, dtype: str) -> ModelCard | None:
    """The card of a model seen before, unchanged since; None otherwise."""
    key = card_key(spec, dtype)
    if key is None:
        return None
    try:
        data = json.loads(_card_path(key).read_text(encoding="utf-8"))
        caps = dict(data["capabilities"], dtypes=tuple(data["capabilities"]["dtypes"]))  # JSON has lists
        return ModelCard(data["description"], Capabilities(**caps), rule_from_dict(data["length_rule"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no card, or a damaged one: load the model


def remember(spec: str, dtype: str, encoder: Encoder) -> ModelCard:
    """The card of a freshly loaded encoder, saved for later runs when the cache is writable."""
    card = ModelCard.of(encoder)
    key = card_key(spec, dtype)
    if key is not None:
        data = {"description": card.description, "capabilities": asdict(card.capabilities),
                "length_rule": rule_to_dict(card.length_rule)}
        try:
            write_atomic_text(_card_path(key), json.dumps(data, sort_keys=True, default=str))
        except OSError:
            pass  # a read-only or full cache only costs the next run a model load
    return card
