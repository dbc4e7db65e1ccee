"""Model sources behind one `Encoder` interface (see base.py), chosen by a spec string.

    resemblyzer            GE2E weights shipped in the resemblyzer wheel (the default;
                           None or "" mean this too)
    wespeaker:DIR          a WeSpeaker model directory (config.yaml + avg_model.pt), or
                           wespeaker:DIR/some.pt to pick one checkpoint of several
    wespeaker-hub:NAME     a WeSpeaker hub name (english, chinese, campplus, eres2net,
                           vblinkp, vblinkf), downloaded by WeSpeaker's own hub code into
                           $WESPEAKER_HOME (default ~/.wespeaker), then loaded as a DIR
    onnx:FILE              a WeSpeaker ONNX export run with onnxruntime; frontend settings
                           from a config.yaml next to it when present

`device`: "cpu", "cuda" or "cuda:N". `dtype`: "fp32" (exact), "bf16" or "fp16" (torch
autocast around the model forward; part of the fingerprint because it changes the
numbers). Extra keyword options go to the encoder (e.g. `max_frames` for WeSpeaker/ONNX).

Nothing here imports torch at module import: `embstore --help` must stay instant.

Encoders return embeddings as computed, NaN/inf included: callers filter rows with
`base.check_finite` and record those items as failed (`NonFiniteEmbedding`), so one bad
item never fails a whole batch.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from typing import TYPE_CHECKING, Any, Iterator

from embstore.models.base import Encoder, ModelError

if TYPE_CHECKING:
    import torch

DEFAULT_SPEC = "resemblyzer"
DTYPES = ("fp32", "bf16", "fp16")
SPEC_FORMS = "resemblyzer, wespeaker:DIR, wespeaker-hub:NAME, onnx:FILE"

__all__ = ["load", "Encoder", "ModelError", "DEFAULT_SPEC", "DTYPES", "SPEC_FORMS"]


def load(spec: str | None = None, device: str = "cpu", dtype: str = "fp32", **options: Any) -> Encoder:
    """The encoder that `spec` names, ready on `device`; `ModelError` (one line) if it cannot be."""
    spec = (spec or "").strip() or DEFAULT_SPEC
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    check_device(device)
    kind, sep, arg = spec.partition(":")
    kind = kind.strip().lower()
    factory: Any = None
    if kind == "resemblyzer" and not sep:
        from embstore.models.resemblyzer import ResemblyzerEncoder as factory
    elif sep and arg and kind == "wespeaker":
        from embstore.models.wespeaker import WeSpeakerEncoder as factory
    elif sep and arg and kind == "wespeaker-hub":
        from embstore.models.hub import load_hub as factory
    elif sep and arg and kind == "onnx":
        from embstore.models.onnx import OnnxEncoder as factory
    if factory is None:
        raise ModelError(f"unknown model spec {spec!r}: use one of {SPEC_FORMS}")
    args = () if kind == "resemblyzer" else (arg.strip(),)
    try:
        inspect.signature(factory).bind(*args, device=device, dtype=dtype, **options)
    except TypeError as exc:  # an option this source does not take
        raise ModelError(f"{spec}: bad option ({exc})") from None
    return factory(*args, device=device, dtype=dtype, **options)


def check_device(device: str) -> None:
    """A device string embstore accepts; whether CUDA exists is checked when a model loads."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device or ""):
        raise ModelError(f"unknown device {device!r}: use cpu, cuda or cuda:N")


def torch_device(device: str) -> "torch.device":
    """The torch device, after checking that a CUDA one really exists."""
    import torch

    check_device(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {device}: CUDA is not available (torch {torch.__version__})")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)


@contextlib.contextmanager
def autocast(device: str, dtype: str) -> Iterator[None]:
    """torch autocast for bf16/fp16 around a forward; nothing for fp32 (the exact path)."""
    import torch

    if dtype == "fp32":
        yield
        return
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch_dtype):
        yield


def safe_name(text: str) -> str:
    """A name usable as a file or array name: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def short_error(exc: BaseException, limit: int = 200) -> str:
    """One line of an exception's message, for ModelError texts."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))
