"""WeSpeaker models from a checkpoint directory: `wespeaker:DIR`.

DIR holds `config.yaml` (WeSpeaker's training config) and `avg_model.pt` (or one other
`.pt`; `wespeaker:DIR/name.pt` picks one of several). The network is built by WeSpeaker's
own zoo (`get_speaker_model(config['model'])(**config['model_args'])`), except CAM++,
which embstore implements itself (`embstore.models.campplus`, equal to the zoo's), so the
default model runs without WeSpeaker installed. The weights
are loaded with `torch.load(weights_only=True)`; training-only tensors (the `projection`
head, margins) are ignored as WeSpeaker's `load_checkpoint` does, but weights the network
needs and the checkpoint lacks are an error, not a silently random layer.

Frontend, per WeSpeaker's CLI (`wespeaker/cli/speaker.py`): Kaldi fbank, 25/10 ms,
dither 0, per-utterance CMN. Mel bins, frame length/shift and sample rate come from the
config's `dataset_args` (`fbank_args`, `resample_rate`) when present. Window and
waveform scaling follow the CLI's conventions by family: CAM++ and ERes2Net (the hub's
3D-Speaker conversions) see normalised floats with a povey window; every other model
sees int16-scaled samples (`wav * 32768`, as `torchaudio.load(normalize=False)`) with a
hamming window. Note the CLI keys this on the hub *name*, so a CAM++/ERes2Net trained
with WeSpeaker's own recipes (hamming, int16) needs the override: an optional section

    embstore:
      window_type: hamming     # povey | hamming | hanning | rectangular
      waveform_norm: false     # true: floats in [-1, 1]; false: int16 scale
      max_frames: 6000

in config.yaml (`dataset_args.fbank_args.window_type` is honoured too).

Long items: an item of up to `max_frames` feature frames (default 6000 = 60 s) is
embedded whole, exactly as WeSpeaker does. A longer one is cut, after utterance-level
CMN, into windows of `max_frames` frames (consecutive, the last one aligned to the end
of the item, so it may overlap its neighbour) whose embeddings are averaged (plain mean
of the raw embeddings, so the scale matches whole-item embeddings). Why 60 s: it covers
nearly every utterance of the usual corpora (VoxCeleb, LibriSpeech, CN-Celeb), so
those get WeSpeaker's exact numbers; it bounds activation memory per forward
(ResNet34's first block is 32 x 80 x T floats: ~60 MB per tensor at 6000 frames, ~3.7 GB
for a one-hour item); and speaker embeddings stop improving long before a minute of
speech. `max_frames=0` embeds every item whole. The policy is recorded in `frontend`
and therefore in the fingerprint.

Batching: "equal" (items of one feature length are stacked without padding, exact), or
"masked" when `embstore.models.masked.build_masked_adapter` supports the architecture:
then mixed lengths are zero-padded and the adapter masks every layer and the pooling.
"""

from __future__ import annotations

import os
import types
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from embstore.errors import ModelError
from embstore.models._wespeaker_import import import_wespeaker as import_raw
from embstore.models.base import Capabilities, fingerprint_of
from embstore.models.common import DTYPES, abspath, autocast, safe_name, short_error, torch_device
from embstore.models.fbank_encoder import DEFAULT_MAX_FRAMES, DEFAULT_WINDOW_BATCH, FbankEncoder, fbank_config_from, read_config

if TYPE_CHECKING:
    import torch


def import_wespeaker(module: str) -> types.ModuleType:
    """`wespeaker.<module>` without its heavy package `__init__` files; ModelError if missing."""
    try:
        return import_raw(module)
    except ImportError as exc:
        raise ModelError(
            f"cannot import wespeaker.{module}: {short_error(exc)} (pip install --no-deps wespeaker-unofficial)"
        ) from None


def _find_checkpoint(target: str) -> tuple[str, str]:
    """(model directory, checkpoint path) for `wespeaker:DIR` or `wespeaker:DIR/x.pt`."""
    path = abspath(target)
    if os.path.isfile(path):
        if not path.endswith((".pt", ".pth")):
            raise ModelError(f"wespeaker:{target}: expected a model directory or a .pt checkpoint")
        return os.path.dirname(path), path
    if not os.path.isdir(path):
        raise ModelError(f"wespeaker:{target}: no such directory")
    if os.path.isfile(os.path.join(path, "avg_model.pt")):
        return path, os.path.join(path, "avg_model.pt")
    candidates = sorted(n for n in os.listdir(path) if n.endswith((".pt", ".pth")))
    if len(candidates) == 1:
        return path, os.path.join(path, candidates[0])
    if not candidates:
        raise ModelError(f"wespeaker:{target}: no avg_model.pt (or other .pt checkpoint) in the directory")
    raise ModelError(
        f"wespeaker:{target}: no avg_model.pt and several checkpoints ({', '.join(candidates[:4])}): "
        f"name one, e.g. wespeaker:{os.path.join(target, candidates[0])}"
    )


def _load_state_dict(path: str) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of many kinds; the reason is what matters
        raise ModelError(f"{path}: cannot load the checkpoint with weights_only=True ({short_error(exc)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ModelError(f"{path}: not a state dict")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def build_model(config: dict[str, Any], where: str) -> Any:
    """WeSpeaker's zoo network for a config, or ModelError naming what is wrong."""
    model_name = config.get("model")
    if not isinstance(model_name, str):
        raise ModelError(f"{where}: config.yaml has no 'model' name")
    frontend_type = (config.get("dataset_args") or {}).get("frontend", "fbank")
    if frontend_type != "fbank":
        raise ModelError(f"{where}: frontend {frontend_type!r} (pretrained SSL features) is not supported; only fbank models")
    if model_name == "CAMPPlus":  # embstore's own CAM++: no WeSpeaker needed (models/campplus.py)
        from embstore.models.campplus import build_campplus

        try:
            return build_campplus(config.get("model_args") or {})
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{where}: cannot build CAMPPlus from model_args ({exc})") from None
    speaker_model = import_wespeaker("models.speaker_model")
    try:
        factory = speaker_model.get_speaker_model(model_name)
    except (SystemExit, AttributeError):  # the zoo calls exit(1) on unknown names
        raise ModelError(f"{where}: model {model_name!r} is not in WeSpeaker's zoo") from None
    try:
        return factory(**(config.get("model_args") or {}))
    except Exception as exc:
        raise ModelError(f"{where}: cannot build {model_name} from model_args ({short_error(exc)})") from None


class WeSpeakerEncoder(FbankEncoder):
    """`wespeaker:DIR`; the options after `dtype` are keyword-only (see the module doc)."""

    def __init__(
        self, target: str, device: str = "cpu", dtype: str = "fp32", *,
        name: str | None = None, spec: str | None = None, config_overrides: dict[str, Any] | None = None,
        max_frames: int | None = None, window_batch: int = DEFAULT_WINDOW_BATCH,
        masked: bool = True, verify_masked: bool = False,
    ) -> None:
        import torch

        self._torch_device = torch_device(device)  # fail before reading any weights
        model_dir, checkpoint = _find_checkpoint(target)
        config_path = os.path.join(model_dir, "config.yaml")
        if not os.path.isfile(config_path):
            raise ModelError(f"wespeaker:{target}: no config.yaml next to {os.path.basename(checkpoint)}")
        config = read_config(config_path)
        if config_overrides:
            config["embstore"] = {**(config.get("embstore") or {}), **config_overrides}
        model = build_model(config, f"wespeaker:{target}")
        state = _load_state_dict(checkpoint)
        expected = model.state_dict()
        # drop what the inference network does not have (projection head, margins), as
        # WeSpeaker's load_checkpoint tolerates; shape mismatches still fail below
        usable = {k: v for k, v in state.items() if k in expected}
        missing = [k for k in expected if k not in usable]
        if missing:
            raise ModelError(
                f"wespeaker:{target}: checkpoint does not match config ({config['model']}): "
                f"{len(missing)} weights missing, e.g. {missing[0]}"
            )
        try:
            model.load_state_dict(usable, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"wespeaker:{target}: checkpoint does not match config ({short_error(exc)})") from None

        self.config = config
        self.model_dir = model_dir
        self.checkpoint = checkpoint
        self.device = device
        self.dtype = dtype
        self.model = model.to(self._torch_device).eval()
        self.fbank_config = fbank_config_from(config, config["model"])
        feat_dim = (config.get("model_args") or {}).get("feat_dim")
        if feat_dim is not None and int(feat_dim) != self.fbank_config.num_mel_bins:
            raise ModelError(
                f"wespeaker:{target}: model feat_dim {feat_dim} != num_mel_bins {self.fbank_config.num_mel_bins}"
            )
        configured = (config.get("embstore") or {}).get("max_frames", DEFAULT_MAX_FRAMES)
        self.max_frames = int(configured if max_frames is None else max_frames)
        self.window_batch = max(1, int(window_batch))
        self.sample_rate = self.fbank_config.sample_rate
        self.spec = spec or f"wespeaker:{abspath(target)}"
        arch = config["model"]
        self.name = name or safe_name(f"wespeaker-{arch}-{os.path.basename(model_dir.rstrip(os.sep))}")
        self.frontend = {
            **self.fbank_config.as_dict(),
            **self._policy(),
            "model": arch,
            "model_args": config.get("model_args") or {},
            "compute_dtype": dtype,
        }
        self.fingerprint = fingerprint_of(usable, self.frontend)  # what the network runs, not the head
        embed_dim = (config.get("model_args") or {}).get("embed_dim")
        if isinstance(embed_dim, int):
            self.dim = embed_dim
        else:  # not every zoo model names it; one short forward tells
            with torch.inference_mode():
                probe = torch.zeros(1, 200, self.fbank_config.num_mel_bins, device=self._torch_device)
                self.dim = int(self._run(probe).shape[-1])
        self._masked = self._find_masked_adapter(verify_masked) if masked else None
        self.capabilities = Capabilities(
            batching="masked" if self._masked is not None else "equal", device_features=True, onnx_export=True,
            runtime="torch", dtypes=DTYPES,
        )

    def _find_masked_adapter(self, verify: bool) -> Callable[..., Any] | None:
        # imported here: masked.py imports torch at load, which the CLI must not
        try:
            from embstore.models.masked import build_masked_adapter
        except ImportError:
            return None
        if not verify:
            return build_masked_adapter(self.model)
        # checked once against single-item runs (seconds on a CPU), in case the installed
        # WeSpeaker differs from the audited one; a mismatch means None (equal batching)
        return build_masked_adapter(self.model, verify_feat_dim=self.fbank_config.num_mel_bins)

    def _run(self, batch: "torch.Tensor") -> "torch.Tensor":
        with autocast(self.device, self.dtype):
            out = self.model(batch)
        # WeSpeaker's models return the embedding, or a tuple ending with it
        out = out[-1] if isinstance(out, (tuple, list)) else out
        return out.float()

    def _to_device(self, batch: Any) -> "torch.Tensor":
        import torch

        if isinstance(batch, torch.Tensor):
            return batch.to(self._torch_device, torch.float32)
        host = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self._torch_device.type == "cuda":
            # one copy per batch from pinned memory, without stalling the host
            return host.pin_memory().to(self._torch_device, non_blocking=True)
        return host

    def _forward(self, batch: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._run(self._to_device(batch)).cpu().numpy()

    def _forward_padded(self, pieces: Sequence[Any]) -> np.ndarray:
        import torch

        if self._masked is None:
            return super()._forward_padded(pieces)
        # lengths stay on the CPU: the adapter needs them there, and a device copy would
        # cost a wait on the GPU per batch
        lengths = torch.tensor([len(p) for p in pieces], dtype=torch.long)
        shape = (len(pieces), int(lengths.max()), self.fbank_config.num_mel_bins)
        if all(isinstance(p, np.ndarray) for p in pieces):
            host = np.zeros(shape, dtype=np.float32)  # padded on the host, one copy to the device
            for i, p in enumerate(pieces):
                host[i, : len(p)] = p
            padded = self._to_device(host)
        else:  # features computed on the device already
            padded = torch.zeros(shape, device=self._torch_device)
            for i, p in enumerate(pieces):
                padded[i, : len(p)] = self._to_device(p)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = self._masked(padded, lengths)
        return out.float().cpu().numpy()

