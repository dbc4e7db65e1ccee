"""`onnx:FILE`: a WeSpeaker model exported to ONNX, run with onnxruntime.

The graph takes one input, fbank features [B, T, F] (float32, CMN applied, as WeSpeaker's
`export_onnx.py` produces: input `feats`, output `embs`, dynamic batch and time axes),
and gives the embedding as its last output.

Frontend settings come from a WeSpeaker `config.yaml` next to the file (`FILE`'s
directory), read exactly as for `wespeaker:DIR` (mel bins, frame length/shift, sample
rate, family window/scaling rule, the optional `embstore:` override section including
`max_frames`). Without one: 16 kHz, 80 mel bins, 25/10 ms, hamming window on
int16-scaled samples (WeSpeaker's ResNet convention). There are no options in the spec
itself: put a config.yaml beside the model to change anything.

Providers: CUDAExecutionProvider first when the device is cuda[:N] and onnxruntime has
it, then CPUExecutionProvider. Only dtype fp32: export a half-precision graph instead.
Long items follow the same windowing policy as the torch WeSpeaker encoder. Batching is
"equal": items of one feature length only.

The fingerprint hashes the ONNX file's bytes and the frontend settings.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from embstore.errors import ModelError
from embstore.audio.fbank import FbankConfig
from embstore.models.base import Capabilities, fingerprint_of
from embstore.models.common import abspath, check_device, safe_name, short_error
from embstore.models.fbank_encoder import (
    DEFAULT_MAX_FRAMES,
    DEFAULT_WINDOW_BATCH,
    FbankEncoder,
    fbank_config_from,
    read_config,
)
from embstore.paths import user_cache_dir


def file_digest(path: str) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


def export_settings(path: str, feat_dim: Any, where: str, max_frames: int | None) -> tuple[FbankConfig, int]:
    """(frontend, max_frames) of an ONNX file, from the config.yaml beside it (module doc);
    `feat_dim` is the graph's feature axis (an int, or a symbolic name that is not checked)."""
    config_path = os.path.join(os.path.dirname(path), "config.yaml")
    config = read_config(config_path) if os.path.isfile(config_path) else {}
    fbank_config = fbank_config_from(config, config.get("model"))
    if isinstance(feat_dim, int) and feat_dim != fbank_config.num_mel_bins:
        raise ModelError(f"{where}: the graph takes {feat_dim} features, frontend gives {fbank_config.num_mel_bins}")
    configured = (config.get("embstore") or {}).get("max_frames", DEFAULT_MAX_FRAMES)
    return fbank_config, int(configured if max_frames is None else max_frames)


class OnnxEncoder(FbankEncoder):
    # a graph runs equal lengths only; fbank may still run batched on a GPU next to it
    capabilities = Capabilities(batching="equal", device_features=True, runtime="onnxruntime")

    def __init__(
        self, target: str, device: str = "cpu", dtype: str = "fp32", *,
        threads: int = 0, max_frames: int | None = None, window_batch: int = DEFAULT_WINDOW_BATCH,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelError("onnx models need onnxruntime (pip install embstore[onnx])") from None
        check_device(device)
        if dtype != "fp32":
            raise ModelError(f"onnx:{target}: dtype {dtype} is not supported (fp32 only; export a fp16 graph instead)")
        path = abspath(target)
        if not os.path.isfile(path):
            raise ModelError(f"onnx:{target}: no such file")
        available = ort.get_available_providers()
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in available:
                raise ModelError(f"onnx:{target}: device {device} but onnxruntime has no CUDAExecutionProvider")
            index = int(device.split(":")[1]) if ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph classes
            raise ModelError(f"onnx:{target}: cannot load ({short_error(exc)})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 3:
            raise ModelError(f"onnx:{target}: expected one [B, T, F] input, got {[(i.name, i.shape) for i in inputs]}")
        self._input = inputs[0].name
        self._output = self.session.get_outputs()[-1].name

        self.fbank_config, self.max_frames = export_settings(path, inputs[0].shape[2], f"onnx:{target}", max_frames)
        self.window_batch = max(1, int(window_batch))
        self.device = device
        self.dtype = dtype
        self.sample_rate = self.fbank_config.sample_rate
        self.spec = f"onnx:{path}"
        self.name = safe_name(f"onnx-{os.path.splitext(os.path.basename(path))[0]}")
        self.frontend = {**self.fbank_config.as_dict(), **self._policy(), "runtime": "onnxruntime"}
        self.fingerprint = fingerprint_of(None, self.frontend, extra=file_digest(path))
        dim = self.session.get_outputs()[-1].shape[-1]
        if not isinstance(dim, int):  # symbolic: one short run tells
            dim = self._forward(np.zeros((1, 200, self.fbank_config.num_mel_bins), dtype=np.float32)).shape[-1]
        self.dim = int(dim)

    @property
    def _torch_device(self) -> Any:
        import torch

        cuda = self.device.startswith("cuda") and torch.cuda.is_available()
        return torch.device(self.device if cuda else "cpu")

    def _forward(self, batch: Any) -> np.ndarray:
        if hasattr(batch, "detach"):  # a torch tensor from features_batch-style callers
            batch = batch.detach().cpu().numpy()
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        out = self.session.run([self._output], {self._input: batch})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(batch), -1)


def cached_export(fingerprint: str) -> str:
    """Where the ONNX export of the model with this fingerprint lives in the user cache
    (shared by every store); the file may not exist yet."""
    return str(user_cache_dir() / "onnx" / fingerprint / "model.onnx")


def export_onnx(encoder: Any, folder: str | None = None) -> str:
    """Export a torch WeSpeaker encoder to `folder/model.onnx` (+ its config.yaml) and
    return the path; an existing export is reused. Time and batch axes are dynamic.

    Without `folder`: the user cache's `cached_export(encoder.fingerprint)`. Concurrent
    exports of one folder are safe and done once (`embstore.models.cache.fill_once`: one process
    exports under a lock, the others wait and reuse it; config.yaml is in place before
    model.onnx appears). The config.yaml records `embstore.source_fingerprint` (the torch
    encoder's fingerprint) next to `max_frames`.

    ONNX Runtime runs ResNet-style models ~1.7x faster than eager torch on CPU with the
    same numbers (cosine 0.9999999), which is why extraction uses it on CPU by default.
    """
    from pathlib import Path

    from embstore.models.cache import fill_once

    target = Path(folder) if folder else Path(cached_export(encoder.fingerprint)).parent
    fill_once(target, "model.onnx", lambda tmp: _write_export(encoder, tmp))
    return str(target / "model.onnx")


def trace_to_onnx(module: Any, example: Any, path: str, dynamic_axes: dict[str, dict[int, str]]) -> None:
    """torch.onnx.export of `module` (one input, one output, named by `dynamic_axes`'
    keys in that order) with the TorchScript exporter, opset 17, on the CPU."""
    import warnings

    import torch

    inputs, outputs = list(dynamic_axes)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter's deprecation and tracer notes: expected, and noise for users
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval().to("cpu"), (example,), path, input_names=[inputs], output_names=[outputs],
                          dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)


def _write_export(encoder: Any, folder: Any) -> None:
    import torch
    import yaml

    class LastOutput(torch.nn.Module):
        # WeSpeaker models return the embedding or a tuple ending with it
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, feats: Any) -> Any:
            out = self.model(feats)
            return out[-1] if isinstance(out, (tuple, list)) else out

    trace_to_onnx(LastOutput(encoder.model), torch.zeros(1, 200, encoder.fbank_config.num_mel_bins),
                  os.path.join(folder, "model.onnx"), {"feats": {0: "B", 1: "T"}, "embs": {0: "B"}})
    config = dict(encoder.config)
    config["embstore"] = {
        **(config.get("embstore") or {}),
        "max_frames": int(encoder.max_frames),
        "source_fingerprint": encoder.fingerprint,
    }
    with open(os.path.join(folder, "config.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
