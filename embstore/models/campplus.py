"""CAM++, the speaker network of 3D-Speaker (Wang et al., "CAM++: A Fast and Efficient
Network for Speaker Verification Using Context-Aware Masking", Interspeech 2023,
arXiv:2303.00332), written here so the default model needs nothing beyond torch.

Why embstore has its own copy instead of depending on WeSpeaker's zoo: the zoo's package
declares requirements that cannot be installed beside this torch (s3prl, whisper,
torchaudio...), so a plain `pip install embstore` could never run it. The network is
small and fully described by the paper; the module names below follow the published
checkpoints' state-dict layout (3D-Speaker's and WeSpeaker's conversions share it), so
their weights load with strict key and shape checks. `tests/test_campplus.py` checks it
against WeSpeaker's zoo where that is installed: equal outputs for equal weights.

Shape of the network, input (B, T, F) fbank frames:
  head    a 2-D residual front end over (frequency, time): one conv, two stages of two
          residual blocks that halve frequency only, one more frequency-halving conv;
          frequency folds into channels: (B, 32 * F/8, T)
  xvector a strided TDNN (kernel 5, stride 2: T/2), then three densely connected TDNN
          blocks (12, 24, 16 layers; dilation 1, 2, 2) each followed by a transition
          that halves the channels; every dense layer gates its output with a
          context-aware mask computed from the utterance mean plus 100-frame segment
          means; statistics pooling (mean, std) and a 1x1 projection to `embed_dim`
          with a non-affine BatchNorm
Everything acts on one time step at a time except the convolutions along time, the
masks' means and the pooling, which is what `embstore.models.masked` needs to run padded
batches exactly (these classes are in its audited list).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CAMPPlus", "build_campplus", "SUPPORTED_ARGS"]

# model_args of WeSpeaker's config.yaml this implementation honours, with its defaults
SUPPORTED_ARGS: dict[str, Any] = {
    "feat_dim": 80,
    "embed_dim": 512,
    "pooling_func": "TSTP",
    "growth_rate": 32,
    "bn_size": 4,
    "init_channels": 128,
    "config_str": "batchnorm-relu",
}
_BLOCKS = ((12, 1), (24, 2), (16, 2))  # (dense layers, dilation) per block, kernel 3


def _named(*pairs: tuple[str, nn.Module]) -> OrderedDict[str, nn.Module]:
    return OrderedDict(pairs)


def _norm_relu(channels: int) -> nn.Sequential:
    # named submodules, as the checkpoints name them ("...nonlinear.batchnorm.weight")
    return nn.Sequential(_named(("batchnorm", nn.BatchNorm1d(channels)), ("relu", nn.ReLU())))


class ResidualBlock2d(nn.Module):
    """Two 3x3 convolutions with a skip; `stride` halves frequency, never time."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        # a strided block needs a projected skip to match shapes; the checkpoints have one
        self.shortcut = nn.Sequential()
        if stride != 1:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels, channels, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class FrequencyFrontEnd(nn.Module):
    """The 2-D head: (B, F, T) -> (B, channels * F/8, T)."""

    def __init__(self, feat_dim: int, channels: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(ResidualBlock2d(channels, 2), ResidualBlock2d(channels, 1))
        self.layer2 = nn.Sequential(ResidualBlock2d(channels, 2), ResidualBlock2d(channels, 1))
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.out_channels = channels * (feat_dim // 8)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        y = F.relu(self.bn2(self.conv2(self.layer2(self.layer1(y)))))
        batch, channels, freq, time = y.shape
        return y.reshape(batch, channels * freq, time)


class StridedTdnn(nn.Module):
    """Conv along time (kernel 5, stride 2, same padding), then BatchNorm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 5, stride=2, padding=2, bias=False)
        self.nonlinear = _norm_relu(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlinear(self.linear(x))


class ContextMask(nn.Module):
    """A local conv whose output is gated by a mask computed from context: the mean over
    the whole utterance plus the mean over the step's 100-frame segment."""

    def __init__(self, channels: int, out_channels: int, dilation: int, reduction: int = 2) -> None:
        super().__init__()
        self.linear_local = nn.Conv1d(channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(channels, channels // reduction, 1)
        self.relu = nn.ReLU()
        self.linear2 = nn.Conv1d(channels // reduction, out_channels, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        context = x.mean(-1, keepdim=True) + self.seg_pooling(x)
        return self.linear_local(x) * self.sigmoid(self.linear2(self.relu(self.linear1(context))))

    def seg_pooling(self, x: Tensor, seg_len: int = 100, stype: str = "avg") -> Tensor:
        """Each step's segment mean (the last segment averages what remains). The masked
        runner reads `seg_len` and `stype` from this signature."""
        if stype != "avg":
            raise ValueError(f"segment pooling {stype!r}: only 'avg'")
        # Sums over zero-padded windows divided by each window's count of real steps: the
        # same numbers as avg_pool1d(ceil_mode=True), but the exported graph never pools a
        # window longer than its input, which OpenVINO's AvgPool gets wrong (empty output
        # for items under seg_len steps, i.e. under ~2 s of speech)
        tail = (0, seg_len - 1)
        sums = F.avg_pool1d(F.pad(x, tail), kernel_size=seg_len, stride=seg_len)
        counts = F.avg_pool1d(F.pad(torch.ones_like(x[:1, :1]), tail), kernel_size=seg_len, stride=seg_len)
        means = sums / counts
        return means.unsqueeze(-1).expand(*means.shape, seg_len).flatten(-2)[..., : x.shape[-1]]


class DenseTdnnLayer(nn.Module):
    """Bottleneck (BN-ReLU-1x1 conv, BN-ReLU) then a context-masked conv: `growth` new channels."""

    def __init__(self, in_channels: int, growth: int, bottleneck: int, dilation: int) -> None:
        super().__init__()
        self.nonlinear1 = _norm_relu(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bottleneck, 1, bias=False)
        self.nonlinear2 = _norm_relu(bottleneck)
        self.cam_layer = ContextMask(bottleneck, growth, dilation)

    def forward(self, x: Tensor) -> Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class DenseTdnnBlock(nn.ModuleList):
    """Densely connected: each layer sees every earlier output, concatenated on channels."""

    def __init__(self, layers: int, in_channels: int, growth: int, bottleneck: int, dilation: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(f"tdnnd{i + 1}", DenseTdnnLayer(in_channels + i * growth, growth, bottleneck, dilation))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class Transition(nn.Module):
    """BN-ReLU then a 1x1 conv that halves the channels between dense blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.nonlinear = _norm_relu(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.nonlinear(x))


class StatisticsPooling(nn.Module):
    """Mean and standard deviation over time (unbiased variance, +1e-7 under the root, as
    the checkpoints were trained with), concatenated."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((x.mean(dim=-1), torch.sqrt(torch.var(x, dim=-1) + 1e-7)), dim=1)


class EmbeddingLayer(nn.Module):
    """1x1 projection of the pooled statistics and a BatchNorm without scale or shift."""

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, embed_dim, 1, bias=False)
        self.nonlinear = nn.Sequential(_named(("batchnorm", nn.BatchNorm1d(embed_dim, affine=False))))

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


class CAMPPlus(nn.Module):
    """CAM++ over (B, T, feat_dim) fbank frames, (B, embed_dim) out."""

    def __init__(self, feat_dim: int = 80, embed_dim: int = 512, growth_rate: int = 32, bn_size: int = 4,
                 init_channels: int = 128) -> None:
        super().__init__()
        self.head = FrequencyFrontEnd(feat_dim)
        stages: list[tuple[str, nn.Module]] = [("tdnn", StridedTdnn(self.head.out_channels, init_channels))]
        channels = init_channels
        for i, (layers, dilation) in enumerate(_BLOCKS, start=1):
            stages.append((f"block{i}", DenseTdnnBlock(layers, channels, growth_rate, bn_size * growth_rate, dilation)))
            channels += layers * growth_rate
            stages.append((f"transit{i}", Transition(channels, channels // 2)))
            channels //= 2
        stages += [
            ("out_nonlinear", _norm_relu(channels)),
            ("stats", StatisticsPooling()),
            ("dense", EmbeddingLayer(2 * channels, embed_dim)),
        ]
        self.xvector = nn.Sequential(_named(*stages))

    def forward(self, x: Tensor) -> Tensor:
        return self.xvector(self.head(x.transpose(1, 2)))


def build_campplus(model_args: dict[str, Any]) -> CAMPPlus:
    """The network for a WeSpeaker config's `model_args`; ValueError for arguments this
    implementation does not have (the caller turns it into a ModelError)."""
    unknown = sorted(set(model_args) - set(SUPPORTED_ARGS))
    if unknown:
        raise ValueError(f"unsupported CAM++ model_args {', '.join(unknown)}")
    args = {**SUPPORTED_ARGS, **model_args}
    if args.pop("pooling_func") != "TSTP" or args.pop("config_str") != "batchnorm-relu":
        raise ValueError("only pooling_func TSTP and config_str batchnorm-relu (the published checkpoints)")
    return CAMPPlus(**{k: int(v) for k, v in args.items()})
