"""Random WeSpeaker model directories for tests: `make_wespeaker_dir(tmp_path, arch=...)`.

Each is what WeSpeaker's training leaves behind (config.yaml + avg_model.pt, including a
training-only `projection` head), from a seeded, randomly initialised zoo network.
Small variants keep the tests fast where the zoo takes sizes as arguments (ECAPA,
CAM++, ERes2Net classes); the ResNets' factories fix their channel counts, so fewer
mel bins (`num_mel_bins`) is the way to make those cheaper.

BatchNorm running statistics are calibrated on random features so a random deep
network gives well-scaled, finite embeddings rather than overflowing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# arch -> (zoo model name, model_args without feat_dim/embed_dim, default embed_dim)
ARCHS: dict[str, tuple[str, dict[str, Any], int]] = {
    "resnet34": ("ResNet34", {"pooling_func": "TSTP", "two_emb_layer": False}, 256),
    "resnet18": ("ResNet18", {"pooling_func": "TSTP", "two_emb_layer": False}, 256),
    "resnet34-2emb": ("ResNet34", {"pooling_func": "TSTP", "two_emb_layer": True}, 256),
    "ecapa": ("ECAPA_TDNN", {"channels": 64, "pooling_func": "ASTP"}, 192),
    "ecapa_c512": ("ECAPA_TDNN_c512", {"pooling_func": "ASTP"}, 192),
    "campplus": ("CAMPPlus", {"growth_rate": 16, "init_channels": 32, "pooling_func": "TSTP"}, 192),
    "campplus-full": ("CAMPPlus", {"pooling_func": "TSTP"}, 512),
    "eres2net": ("ERes2Net", {"m_channels": 8, "num_blocks": [1, 1, 1, 1], "pooling_func": "TSTP"}, 192),
    "xvector": ("XVEC", {"hid_dim": 128, "stats_dim": 256, "pooling_func": "TSTP"}, 128),
}


def make_wespeaker_dir(
    tmp_path: Path | str,
    arch: str = "resnet34",
    embed_dim: int | None = None,
    num_mel_bins: int = 80,
    seed: int = 0,
    name: str | None = None,
    extra_config: dict[str, Any] | None = None,
    projection_classes: int = 10,
) -> Path:
    """A WeSpeaker model directory under `tmp_path` (created); returns its path."""
    import torch
    import yaml

    from embstore.models.wespeaker import build_model

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    model_name, args, default_dim = ARCHS[arch]
    config: dict[str, Any] = {
        "model": model_name,
        "model_args": {"feat_dim": num_mel_bins, "embed_dim": embed_dim or default_dim, **args},
        "dataset_args": {
            "resample_rate": 16000,
            "fbank_args": {"num_mel_bins": num_mel_bins, "frame_shift": 10, "frame_length": 25, "dither": 1.0},
        },
        "projection_args": {"project_type": "arc_margin"},
    }
    for key, value in (extra_config or {}).items():
        config[key] = value
    torch.manual_seed(seed)
    model = build_model(config, arch)
    _calibrate_batchnorm(model, num_mel_bins, seed)
    state = dict(model.state_dict())
    # a training checkpoint also holds the classifier head; inference must ignore it
    generator = torch.Generator().manual_seed(seed)
    state["projection.weight"] = torch.randn(projection_classes, config["model_args"]["embed_dim"], generator=generator)
    out = Path(tmp_path) / (name or f"{arch}-{seed}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    torch.save(state, out / "avg_model.pt")
    return out


def _calibrate_batchnorm(model: Any, num_mel_bins: int, seed: int) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass sets the statistics
    generator = torch.Generator().manual_seed(seed + 1)
    feats = torch.randn(2, 100, num_mel_bins, generator=generator) * 3.0
    model.train()
    with torch.no_grad():
        model(feats)
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
