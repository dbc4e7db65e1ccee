"""Resemblyzer's GE2E network (resemblyzer.voice_encoder.VoiceEncoder), without the package import.

`import resemblyzer` runs its `__init__`, which imports resemblyzer.audio: librosa,
scipy.ndimage and webrtcvad's pkg_resources, ~0.25 s per process that embstore's
vectorised frontend does not need. The network is three lines of torch; the weights are
the wheel's own `pretrained.pt`, loaded as VoiceEncoder loads them (its `model_state`;
`similarity_weight`/`similarity_bias` are GE2E training parameters that VoiceEncoder's
`strict=False` skips too), so the state dict, the numbers and the fingerprint are the
package's. Imported only when the model is loaded (torch at module level).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from embstore.errors import ModelError

HIDDEN = 256
EMBEDDING = 256
LAYERS = 3
N_MELS = 40
# keys of the checkpoint's model_state that are not part of the encoder
_TRAINING_ONLY = ("similarity_weight", "similarity_bias")


def weights_path() -> Path:
    """The wheel's pretrained.pt, found without executing the package."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the resemblyzer package: pip install resemblyzer")
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"
    if not path.is_file():
        raise ModelError(f"resemblyzer is installed without its weights ({path} is missing)")
    return path


class GE2E(nn.Module):
    """VoiceEncoder's forward: LSTM(40, 256, 3) -> last layer's final hidden state -> Linear -> ReLU
    -> L2 normalisation, on [batch, frames, 40] mel windows."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, HIDDEN, LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN, EMBEDDING)
        self.relu = nn.ReLU()
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)["model_state"]
        self.load_state_dict({k: v for k, v in state.items() if k not in _TRAINING_ONLY})
        self.device = device
        self.to(device)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        raw = self.relu(self.linear(hidden[-1]))
        return raw / torch.norm(raw, dim=1, keepdim=True)
