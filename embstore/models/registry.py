"""Model sources by spec prefix: `load(spec)` finds the adapter and builds the encoder.

    campplus               3D-Speaker's CAM++ (the default; None or "" mean this too), its
                           weights fetched once into the user cache and checked by sha256
                           (`embstore.models.pretrained`); campplus:PATH.pt takes them from
                           a file; campplus-zh-en-common is the same model's full name
    resemblyzer            GE2E weights shipped in the resemblyzer wheel (the default
                           before 0.3)
    wespeaker:DIR          a WeSpeaker model directory (config.yaml + avg_model.pt), or
                           wespeaker:DIR/some.pt to pick one checkpoint of several
    wespeaker-hub:NAME     a WeSpeaker hub name (english, chinese, campplus, eres2net,
                           vblinkp, vblinkf), downloaded by WeSpeaker's own hub code into
                           $WESPEAKER_HOME (default ~/.wespeaker), then loaded as a DIR
    onnx:FILE              a WeSpeaker ONNX export run with onnxruntime; frontend settings
                           from a config.yaml next to it when present
    openvino:FILE.onnx     the same with OpenVINO on CPU (fp32, or bf16 on AMX/AVX512-BF16)
    openvino:DIR           a WeSpeaker model directory, exported once to ONNX into the user
                           cache, run with OpenVINO; openvino:resemblyzer the default model's
                           LSTM likewise (embstore.models.openvino)
    null:DIM               no model: a fixed DIM-sized vector per item (benchmarks of the
                           pipeline around the model; see `embstore.models.null`)

`device`: "cpu", "cuda" or "cuda:N". `dtype`: "fp32" (exact; TF32 off on CUDA), "tf32"
(CUDA's TF32 matrix mode; fp32 on CPU), "bf16" or "fp16" (torch autocast around the
model forward); part of the fingerprint because it changes the numbers. Extra keyword options go to the encoder (e.g. `max_frames` for WeSpeaker/ONNX).

Encoders return embeddings as computed, NaN/inf included: callers filter rows with
`embstore.vectors.finite_nonzero` and record those items as failed, so one bad item never
fails a whole batch.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from embstore.errors import ModelError
from embstore.models.base import Encoder
from embstore.models.common import DTYPES, check_device
from embstore.models.hub import load_hub
from embstore.models.null import NullEncoder
from embstore.models.onnx import OnnxEncoder
from embstore.models.openvino import load_openvino
from embstore.models.pretrained import DEFAULT as DEFAULT_PRETRAINED
from embstore.models.pretrained import KNOWN, load_pretrained
from embstore.models.resemblyzer import ResemblyzerEncoder
from embstore.models.wespeaker import WeSpeakerEncoder

DEFAULT_SPEC = DEFAULT_PRETRAINED.spec  # "campplus"


@dataclass(frozen=True)
class ModelSource:
    """One kind of spec: `prefix` alone (no argument) or `prefix:ARG`."""

    prefix: str
    factory: Callable[..., Encoder]
    takes_argument: bool
    form: str  # how users write it
    optional_argument: bool = False  # `prefix` alone or `prefix:ARG`


def _pretrained_sources() -> list[ModelSource]:
    return [
        ModelSource(name, functools.partial(load_pretrained, model), takes_argument=False,
                    form=f"{name}[:FILE.pt]", optional_argument=True)
        for model in KNOWN for name in (*model.aliases, model.name)
    ]


SOURCES: dict[str, ModelSource] = {
    source.prefix: source
    for source in (
        *_pretrained_sources(),
        ModelSource("resemblyzer", ResemblyzerEncoder, takes_argument=False, form="resemblyzer"),
        ModelSource("wespeaker", WeSpeakerEncoder, takes_argument=True, form="wespeaker:DIR"),
        ModelSource("wespeaker-hub", load_hub, takes_argument=True, form="wespeaker-hub:NAME"),
        ModelSource("onnx", OnnxEncoder, takes_argument=True, form="onnx:FILE"),
        ModelSource("openvino", load_openvino, takes_argument=True, form="openvino:FILE.onnx|DIR|resemblyzer"),
        ModelSource("null", NullEncoder, takes_argument=True, form="null:DIM"),
    )
}
SPEC_FORMS = ", ".join(s.form for s in SOURCES.values())


def parse_spec(spec: str | None) -> tuple[ModelSource, str | None]:
    """The source a spec names and its argument; ModelError for anything else."""
    spec = (spec or "").strip() or DEFAULT_SPEC
    kind, sep, arg = spec.partition(":")
    source = SOURCES.get(kind.strip().lower())
    if source is None or (source.takes_argument and not arg.strip()) or (
            not source.takes_argument and not source.optional_argument and sep):
        raise ModelError(f"unknown model spec {spec!r}: use one of {SPEC_FORMS}")
    return source, arg.strip() if (source.takes_argument or source.optional_argument) and arg.strip() else None


def load(spec: str | None = None, device: str = "cpu", dtype: str = "fp32", **options: Any) -> Encoder:
    """The encoder that `spec` names, ready on `device`; `ModelError` (one line) if it cannot be."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    check_device(device)
    source, arg = parse_spec(spec)
    args = () if arg is None else (arg,)
    try:
        inspect.signature(source.factory).bind(*args, device=device, dtype=dtype, **options)
    except TypeError as exc:  # an option this source does not take
        raise ModelError(f"{(spec or DEFAULT_SPEC).strip()}: bad option ({exc})") from None
    return source.factory(*args, device=device, dtype=dtype, **options)
