"""Helpers every model adapter shares: devices, autocast, names and messages.

Nothing here imports torch at module import: `embstore --help` must stay instant.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import TYPE_CHECKING, Iterator

from embstore.errors import ModelError

if TYPE_CHECKING:
    import torch

# fp32: exact float32 (on CUDA with TF32 off, whatever the process defaults are);
# tf32: float32 tensors through CUDA's TF32 matrix units (convs and matmuls, ~1e-4
# relative error, several times faster on Ampere and later; on CPU it computes fp32);
# bf16/fp16: torch autocast. Each is part of a model's fingerprint.
DTYPES = ("fp32", "tf32", "bf16", "fp16")


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
    """The precision of one forward: autocast for bf16/fp16; for fp32 and tf32 on CUDA
    the TF32 switches set for the call (fp32 off, tf32 on) and restored afterwards."""
    import torch

    if dtype in ("fp32", "tf32"):
        if not device.startswith("cuda"):
            yield  # CPU kernels have no TF32 mode: both are plain float32 there
            return
        with _tf32(dtype == "tf32"):
            yield
        return
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch_dtype):
        yield


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    # torch's cuDNN default is TF32 *on* for convs: fp32 must switch it off to be fp32.
    # The legacy flags, as masked.py uses them: torch refuses a mix of the legacy and the
    # newer `fp32_precision` API in one process.
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def safe_name(text: str) -> str:
    """A name usable as a file or array name: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def short_error(exc: BaseException, limit: int = 200) -> str:
    """One line of an exception's message, for ModelError texts."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))
