"""Exact padded batches of mixed lengths for WeSpeaker zoo models.

Why padding is normally not exact: a zero-padded item sees, near its end, the padding
frames through every temporal convolution, and the statistics pooling averages over them.
Both move the embedding (cosine ~0.99 against the item run alone).

Why the masked run is exact: run alone, an item of length L is zero-padded by each conv
(`padding=p`) and nothing exists past its end. In a padded batch the same holds if, right
before every convolution whose kernel spans more than one time step, the activations past
the item's own valid length are set back to zero, and if every operation that reduces
over time (statistics/attentive pooling, squeeze-excitation means, CAM++'s context
pooling, SimAM's energy) only reduces over the valid steps. Everything else in the
supported networks acts on one time step at a time (BatchNorm in eval mode, ReLU,
residual sums, 1x1 convs...), so past-the-end garbage (e.g. BN(0) = bias) never reaches a
valid step. Valid lengths are tracked through every strided/unpadded conv with
``L_out = (L + 2p - d(k-1) - 1) // s + 1``.

How: `build_masked_adapter` checks that every module in the model is one whose forward
was audited for this property, then, for the duration of one adapter call only, installs
forward hooks on the convolutions (mask the input, derive the output lengths) and swaps
in masked forwards for the time-reducing modules; the zoo's own submodules and weights do
all the arithmetic. Unknown architectures get ``None``, and the caller falls back to
batches of equal lengths.

Lengths are looked up by the padded time size of a tensor (its last dimension): in the
supported networks each time resolution has its own padded size, and a clash between two
different length sets raises instead of guessing.

Not thread-safe against *plain* calls of the same model instance from another thread
while an adapter call is running (hooks are installed on the shared modules); adapter
calls on one model serialize on a lock.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embstore.errors import UnsupportedModel

MaskedAdapter = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "MaskedAdapter",
    "build_masked_adapter",
    "unsupported_reason",
    "pad_batch",
    "check_masked_adapter",
    "conv_output_length",
]

_WS = "wespeaker.models."

# Zoo classes whose own forward code was read: apart from calls into submodules, it only
# does per-time-step arithmetic (adds, products, concatenation along channels, reshapes of
# channel/frequency axes), so it needs no change. The tuple lists methods that reduce over
# time and are swapped for masked versions during a call.
_AUDITED: dict[str, tuple[str, ...]] = {
    # ResNet family
    "resnet.ResNet": (),
    "resnet.BasicBlock": (),
    "resnet.Bottleneck": (),
    # ECAPA-TDNN
    "ecapa_tdnn.ECAPA_TDNN": (),
    "ecapa_tdnn.SE_Res2Block": (),
    "ecapa_tdnn.Conv1dReluBn": (),
    "ecapa_tdnn.Res2Conv1dReluBn": (),
    # CAM++
    "campplus.CAMPPlus": (),
    "campplus.FCM": (),
    "campplus.BasicResBlock": (),
    "campplus.TDNNLayer": (),
    "campplus.CAMDenseTDNNBlock": (),
    "campplus.CAMDenseTDNNLayer": (),
    "campplus.TransitLayer": (),
    "campplus.DenseLayer": (),
    # ERes2Net / Res2Net
    "eres2net.ERes2Net": (),
    "eres2net.BasicBlockERes2Net": (),
    "eres2net.BasicBlockERes2Net_diff_AFF": (),
    "eres2net.AFF": (),
    "eres2net.ReLU": (),
    "res2net.Res2Net": (),
    "res2net.BasicBlockRes2Net": (),
    # Gemini DF-ResNet
    "gemini_dfresnet.Gemini_DF_ResNet": (),
    "gemini_dfresnet.Inverted_Bottleneck": (),
    # x-vector TDNN (unpadded convs: lengths shrink by the context)
    "tdnn.XVEC": (),
    "tdnn.TdnnLayer": (),
    # RepVGG (training-time branches or re-parameterised deploy form)
    "repvgg.RepVGG": (),
    "repvgg.RepVGGBlock": (),
    "repvgg.RepSPKBlock": (),
    # SimAM-ResNet: the block's SimAM energy is a mean/variance over frequency and time
    "samresnet.ResNet": (),
    "samresnet.SimAMBasicBlock": ("SimAM",),
    "samresnet.SimAM_ResNet34_ASP": (),
    "samresnet.SimAM_ResNet100_ASP": (),
}

# Zoo modules that reduce over time in their forward; a masked forward replaces theirs
# during a call (their submodules are called by the replacement, not checked one by one).
_REPLACED = {
    "pooling_layers.TAP",
    "pooling_layers.TSDP",
    "pooling_layers.TSTP",
    "pooling_layers.ASTP",
    "pooling_layers.ASP",
    "pooling_layers.MHASTP",
    "pooling_layers.MQMHASTP",
    "ecapa_tdnn.SE_Connect",
    "campplus.CAMLayer",
    "repvgg.SEBlock_2D",
}
_POOLINGS = {name for name in _REPLACED if name.startswith("pooling_layers.")}

# torch modules that act on each time step alone in eval mode (exact types: a subclass
# could override forward). Linear appears only after pooling or inside replaced modules.
_POINTWISE: tuple[type, ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.PReLU,
    nn.LeakyReLU,
    nn.SiLU,
    nn.GELU,
    nn.ELU,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
    nn.Linear,
    nn.Sequential,
    nn.ModuleList,
)
_CONVS: tuple[type, ...] = (nn.Conv1d, nn.Conv2d)


# embstore's own CAM++ (embstore.models.campplus): the same computation as the zoo's
# classes, module for module (tests/test_campplus.py), so it is audited under their keys
_OWN_CAMPPLUS = {
    "CAMPPlus": "campplus.CAMPPlus",
    "FrequencyFrontEnd": "campplus.FCM",
    "ResidualBlock2d": "campplus.BasicResBlock",
    "StridedTdnn": "campplus.TDNNLayer",
    "DenseTdnnBlock": "campplus.CAMDenseTDNNBlock",
    "DenseTdnnLayer": "campplus.CAMDenseTDNNLayer",
    "ContextMask": "campplus.CAMLayer",
    "Transition": "campplus.TransitLayer",
    "EmbeddingLayer": "campplus.DenseLayer",
    "StatisticsPooling": "pooling_layers.TSTP",
}


def _key(module: nn.Module) -> str:
    cls = type(module)
    mod = cls.__module__
    if mod == "embstore.models.campplus" and cls.__qualname__ in _OWN_CAMPPLUS:
        return _OWN_CAMPPLUS[cls.__qualname__]
    return mod[len(_WS):] + "." + cls.__qualname__ if mod.startswith(_WS) else mod + "." + cls.__qualname__


def conv_output_length(length: int | Tensor, kernel: int, stride: int = 1, padding: int = 0,
                       dilation: int = 1) -> int | Tensor:
    """Valid output frames of a conv along time for an input of `length` valid frames."""
    out = (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if isinstance(out, Tensor):
        return out.clamp(min=0)
    return max(int(out), 0)


@dataclass(frozen=True)
class _ConvTime:
    """A conv's geometry along the time (last) axis."""

    kernel: int
    stride: int
    padding: int  # left/right zero padding; for padding='same' the length is unchanged
    dilation: int
    same: bool

    @property
    def needs_mask(self) -> bool:
        # only a kernel wider than one step can see past an item's end into valid outputs
        return self.kernel > 1

    @property
    def keeps_length(self) -> bool:
        return self.same or (self.stride == 1 and 2 * self.padding == self.dilation * (self.kernel - 1))

    def out_length(self, length: Any) -> Any:
        if self.same:
            return length
        return conv_output_length(length, self.kernel, self.stride, self.padding, self.dilation)


def _conv_time(conv: nn.Module) -> _ConvTime:
    if conv.padding_mode != "zeros":
        raise UnsupportedModel(f"conv with padding_mode={conv.padding_mode!r}")
    kernel, stride, dilation = conv.kernel_size[-1], conv.stride[-1], conv.dilation[-1]
    padding = conv.padding
    if isinstance(padding, str):
        return _ConvTime(kernel, stride, 0, dilation, same=(padding == "same"))
    return _ConvTime(kernel, stride, padding[-1], dilation, same=False)


@dataclass
class _Plan:
    convs: list[tuple[nn.Module, _ConvTime]] = field(default_factory=list)
    replaced: list[tuple[nn.Module, str]] = field(default_factory=list)
    methods: list[tuple[nn.Module, str]] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)


def _check_replaced(module: nn.Module, key: str) -> None:
    """Fail early when a replaced module lacks what its masked forward uses."""
    needed = {
        "pooling_layers.ASTP": ("linear1", "linear2", "global_context_att"),
        "pooling_layers.ASP": ("attention", "feature_dim"),
        "pooling_layers.MHASTP": ("heads_att_trans", "head_num"),
        "pooling_layers.MQMHASTP": ("n_query",),
        "ecapa_tdnn.SE_Connect": ("linear1", "linear2"),
        "campplus.CAMLayer": ("linear_local", "linear1", "linear2", "seg_pooling"),
        "repvgg.SEBlock_2D": ("fc_1", "fc_2", "relu", "sigmoid"),
    }.get(key, ())
    for name in needed:
        if not hasattr(module, name):
            raise UnsupportedModel(f"{key} without attribute {name!r}")
    if key == "pooling_layers.ASP":
        last = module.attention[-1]
        if type(last) is not nn.Softmax or last.dim not in (2, -1):
            raise UnsupportedModel("ASP attention does not end in Softmax over time")
    if key == "pooling_layers.MQMHASTP":
        for sub in module.n_query:
            if _key(sub) != "pooling_layers.MHASTP":
                raise UnsupportedModel("MQMHASTP with a non-MHASTP query")
            _check_replaced(sub, "pooling_layers.MHASTP")
    if key == "campplus.CAMLayer":
        seg_len, stype = _seg_pooling_defaults(module)
        if stype != "avg" or not isinstance(seg_len, int) or seg_len < 1:
            raise UnsupportedModel(f"CAMLayer segment pooling {stype!r}/{seg_len!r}")
    # SEBlock_2D's AdaptiveAvgPool2d is what the masked forward does instead; never called
    unused = (nn.AdaptiveAvgPool2d,) if key == "repvgg.SEBlock_2D" else ()
    for sub in module.modules():
        if sub is module:
            continue
        if not (type(sub) in _CONVS or type(sub) in _POINTWISE or type(sub) is nn.Softmax
                or type(sub) in unused or _key(sub) in _REPLACED):
            raise UnsupportedModel(f"{key} contains {_key(sub)}")


@functools.lru_cache(maxsize=None)
def _seg_pooling_defaults_of(cls: type) -> tuple[Any, Any]:
    # CAMLayer.forward calls seg_pooling(x) with its defaults; read them instead of assuming
    params = inspect.signature(cls.seg_pooling).parameters
    seg_len = params["seg_len"].default if "seg_len" in params else None
    stype = params["stype"].default if "stype" in params else None
    return seg_len, stype


def _seg_pooling_defaults(module: nn.Module) -> tuple[Any, Any]:
    return _seg_pooling_defaults_of(type(module))


def _plan(model: nn.Module) -> _Plan:
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModel("TorchScript module")
    top = _key(model)
    if top not in _AUDITED:
        raise UnsupportedModel(f"architecture {top}")
    plan = _Plan()
    skip: list[str] = []
    pools = 0
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        plan.modules.append(module)
        key = _key(module)
        if type(module) in _CONVS:
            plan.convs.append((module, _conv_time(module)))
        elif key in _REPLACED:
            _check_replaced(module, key)
            # the same pooling object can be registered twice (CAM++: pool and xvector.stats)
            if all(module is not m for m, _ in plan.replaced):
                plan.replaced.append((module, key))
                pools += key in _POOLINGS
            skip.append(name + ".")
            for sub in module.modules():
                if sub is module:
                    continue
                plan.modules.append(sub)
                # e.g. CAMLayer.linear_local spans 3 steps: its input needs masking too
                if type(sub) in _CONVS:
                    plan.convs.append((sub, _conv_time(sub)))
        elif key in _AUDITED:
            for method in _AUDITED[key]:
                plan.methods.append((module, method))
        elif type(module) in _POINTWISE:
            pass
        else:
            raise UnsupportedModel(f"module {key}")
    if pools != 1:
        raise UnsupportedModel(f"{pools} known pooling layers (need exactly one)")
    return plan


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `build_masked_adapter` would return None for `model`, or None if it is supported."""
    try:
        _plan(model)
    except UnsupportedModel as exc:
        return str(exc)
    return None


class _Run:
    """Valid lengths per padded time size during one adapter call.

    Lengths live on the CPU, so deriving them through strided convs and checking them for
    clashes never waits for the accelerator; each resolution's lengths are copied to the
    device once, asynchronously, for its mask and counts.
    """

    def __init__(self, lengths: Tensor, padded: int, device: torch.device) -> None:
        self.device = device
        self.lengths: dict[int, Tensor] = {padded: lengths}
        self._on_device: dict[int, Tensor] = {}
        self._invalid: dict[int, Tensor] = {}

    def length(self, size: int) -> Tensor:
        """[B] long, on the CPU."""
        try:
            return self.lengths[size]
        except KeyError:
            raise RuntimeError(f"masked adapter: no valid lengths known for time size {size}") from None

    def device_length(self, size: int) -> Tensor:
        """[B] long, on the model's device."""
        lengths = self._on_device.get(size)
        if lengths is None:
            lengths = self.length(size)
            if self.device.type == "cuda":
                lengths = lengths.pin_memory()  # lets the copy below not block the host
            lengths = self._on_device[size] = lengths.to(self.device, non_blocking=True)
        return lengths

    def register(self, size: int, lengths: Tensor) -> None:
        known = self.lengths.get(size)
        if known is None:
            self.lengths[size] = lengths
        elif not torch.equal(known, lengths):
            raise RuntimeError(f"masked adapter: two different length sets share time size {size}")

    def invalid(self, size: int) -> Tensor:
        """[B, size] bool on the device, True on the steps past each item's end."""
        mask = self._invalid.get(size)
        if mask is None:
            mask = torch.arange(size, device=self.device)[None, :] >= self.device_length(size)[:, None]
            self._invalid[size] = mask
        return mask

    def invalid_for(self, x: Tensor) -> Tensor:
        """`invalid` shaped to broadcast against x (time = last axis)."""
        mask = self.invalid(x.shape[-1])
        return mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])

    def zero_invalid(self, x: Tensor) -> Tensor:
        # masked_fill, not a product: inf/NaN past the end must not survive as NaN
        return x.masked_fill(self.invalid_for(x), 0.0)

    def count_for(self, x: Tensor) -> Tensor:
        """Valid steps per item, shaped [B, 1, ...] to divide x reduced over time."""
        lengths = self.device_length(x.shape[-1]).to(x.dtype)
        return lengths.view(lengths.shape[0], *([1] * (x.dim() - 2)))

    # masked reductions over the last (time) axis ------------------------------------
    def mean(self, x: Tensor) -> Tensor:
        xs = _wide(x)
        return (self.zero_invalid(xs).sum(-1) / self.count_for(xs)).to(x.dtype)

    def var(self, x: Tensor, mean: Tensor) -> Tensor:
        # torch.var's default: unbiased (N - 1), which the zoo's TSTP/TSDP rely on
        xs = _wide(x)
        centred = self.zero_invalid(xs - _wide(mean).unsqueeze(-1))
        return (centred.pow(2).sum(-1) / (self.count_for(xs) - 1)).to(x.dtype)

    def softmax(self, logits: Tensor) -> Tensor:
        masked = _wide(logits).masked_fill(self.invalid_for(logits), float("-inf"))
        return masked.softmax(dim=-1).to(logits.dtype)


def _wide(x: Tensor) -> Tensor:
    # Under fp16 autocast a sum of squares over a long utterance can pass 65504: reduce
    # over time in fp32 (the bf16/fp16 run is approximate anyway; fp32 runs are unchanged).
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# masked forwards of the time-reducing modules ------------------------------------------
# Each mirrors the zoo module's arithmetic (same eps, same variance convention) with every
# reduction over time restricted to the item's valid steps.

def _flatten_time(x: Tensor) -> Tensor:
    # the zoo's attentive poolings fold [B, C, F, T] into [B, C*F, T]
    if x.dim() == 4:
        return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])
    return x


def _attentive_stats(run: _Run, x: Tensor, weights: Tensor, floor: float) -> Tensor:
    dtype = x.dtype
    x, weights = run.zero_invalid(_wide(x)), _wide(weights)
    mean = torch.sum(weights * x, dim=2)
    var = torch.sum(weights * x.pow(2), dim=2) - mean.pow(2)
    return torch.cat([mean, torch.sqrt(var.clamp(min=floor))], dim=1).to(dtype)


def _pool_tap(run: _Run, module: nn.Module, x: Tensor) -> Tensor:
    return run.mean(x).flatten(start_dim=1)


def _pool_tsdp(run: _Run, module: nn.Module, x: Tensor) -> Tensor:
    mean = run.mean(x)
    return torch.sqrt(run.var(x, mean) + 1e-7).flatten(start_dim=1)


def _pool_tstp(run: _Run, module: nn.Module, x: Tensor) -> Tensor:
    mean = run.mean(x)
    std = torch.sqrt(run.var(x, mean) + 1e-7)
    return torch.cat((mean.flatten(start_dim=1), std.flatten(start_dim=1)), 1)


def _pool_astp(run: _Run, module: nn.Module, x: Tensor) -> Tensor:
    x = _flatten_time(x)
    if module.global_context_att:
        mean = run.mean(x)
        std = torch.sqrt(run.var(x, mean) + 1e-7)
        x_in = torch.cat((x, mean.unsqueeze(-1).expand_as(x), std.unsqueeze(-1).expand_as(x)), dim=1)
    else:
        x_in = x
    alpha = torch.tanh(module.linear1(x_in))
    alpha = run.softmax(module.linear2(alpha))
    return _attentive_stats(run, x, alpha, 1e-7)


def _pool_asp(run: _Run, module: nn.Module, x: Tensor) -> Tensor:
    if x.dim() == 4:
        x = x.reshape(x.shape[0], -1, x.shape[-1])
    elif x.dim() == 3 and x.shape[1] != module.feature_dim:
        # [B, T, D] input (W2V-BERT front ends): time is not the last axis
        raise RuntimeError("masked ASP supports [B, C, F, T] and [B, D, T] inputs only")
    hidden = x
    for layer in list(module.attention)[:-1]:
        hidden = layer(hidden)
    weights = run.softmax(hidden)
    return _attentive_stats(run, x, weights, 1e-5)


def _pool_mhastp(run: _Run, module: nn.Module, x: Tensor) -> Tensor:
    x = _flatten_time(x)
    chunks = torch.chunk(x, module.head_num, 1)
    outs = []
    for chunk, layer in zip(chunks, module.heads_att_trans):
        alpha = run.softmax(layer(chunk))
        outs.append(_attentive_stats(run, chunk, alpha, 1e-7))
    return torch.cat(outs, dim=1)


def _pool_mqmhastp(run: _Run, module: nn.Module, x: Tensor) -> Tensor:
    x = _flatten_time(x)
    return torch.cat([_pool_mhastp(run, query, x) for query in module.n_query], dim=-1)


def _se_connect(run: _Run, module: nn.Module, x: Tensor) -> Tensor:
    scale = F.relu(module.linear1(run.mean(x)))
    scale = torch.sigmoid(module.linear2(scale))
    return x * scale.unsqueeze(2)


def _se_block_2d(run: _Run, module: nn.Module, x: Tensor) -> Tensor:
    # AdaptiveAvgPool2d(1) = mean over frequency and time: here over valid time only
    b, c = x.shape[0], x.shape[1]
    pooled = run.mean(x).mean(-1).view(b, c)
    scale = module.sigmoid(module.fc_2(module.relu(module.fc_1(pooled))))
    return x * scale.view(b, c, 1, 1)


def _cam_layer(run: _Run, module: nn.Module, x: Tensor) -> Tensor:
    y = module.linear_local(x)
    context = run.mean(x).unsqueeze(-1) + _segment_means(run, x, _seg_pooling_defaults(module)[0])
    context = module.relu(module.linear1(context))
    gate = module.sigmoid(module.linear2(context))
    return y * gate


def _segment_means(run: _Run, x: Tensor, seg_len: int) -> Tensor:
    """CAM++'s segment pooling per item: means over consecutive `seg_len` valid steps,
    the last segment over what remains (avg_pool1d with ceil_mode and no padding),
    broadcast back to every step of its segment."""
    size, dtype = x.shape[-1], x.dtype
    x = _wide(x)
    n_seg = -(-size // seg_len)
    xz = F.pad(run.zero_invalid(x), (0, n_seg * seg_len - size))
    sums = xz.view(*x.shape[:-1], n_seg, seg_len).sum(-1)
    starts = torch.arange(n_seg, device=x.device) * seg_len
    counts = (run.device_length(size)[:, None] - starts[None, :]).clamp(min=1, max=seg_len)
    counts = counts.view(counts.shape[0], *([1] * (x.dim() - 2)), n_seg).to(x.dtype)
    means = sums / counts
    return means.repeat_interleave(seg_len, dim=-1)[..., :size].to(dtype)


def _simam(run: _Run, block: nn.Module, lambda_p: float) -> Callable[..., Tensor]:
    def simam(X: Tensor, lambda_p: float = lambda_p) -> Tensor:
        # the zoo's energy uses the mean and the (N - 1) variance over all F*T positions
        Xw = _wide(X)
        valid = run.count_for(Xw).unsqueeze(-1) * X.shape[2]
        mean = run.zero_invalid(Xw).sum(dim=[2, 3], keepdim=True) / valid
        d = (Xw - mean).pow(2)
        v = run.zero_invalid(d).sum(dim=[2, 3], keepdim=True) / (valid - 1)
        e_inv = d / (4 * (v + lambda_p)) + 0.5
        return X * block.sigmoid(e_inv).to(X.dtype)

    return simam


_FORWARDS: dict[str, Callable[[_Run, nn.Module, Tensor], Tensor]] = {
    "pooling_layers.TAP": _pool_tap,
    "pooling_layers.TSDP": _pool_tsdp,
    "pooling_layers.TSTP": _pool_tstp,
    "pooling_layers.ASTP": _pool_astp,
    "pooling_layers.ASP": _pool_asp,
    "pooling_layers.MHASTP": _pool_mhastp,
    "pooling_layers.MQMHASTP": _pool_mqmhastp,
    "ecapa_tdnn.SE_Connect": _se_connect,
    "campplus.CAMLayer": _cam_layer,
    "repvgg.SEBlock_2D": _se_block_2d,
}


@functools.lru_cache(maxsize=None)
def _method_default(cls: type, method: str, param: str) -> Any:
    return inspect.signature(getattr(cls, method)).parameters[param].default


# hooks ------------------------------------------------------------------------------------

def _conv_pre_hook(run: _Run, geometry: _ConvTime) -> Callable:
    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if not geometry.needs_mask:
            return None
        x = args[0]
        # In place: values past an item's end never reach a valid step (every temporal
        # conv zeroes them first, every reduction skips them), so whoever else holds this
        # tensor (a residual branch, a channel split's base) may see them zeroed too.
        # Saves a copy per conv: ~10% -> ~2% overhead on ResNet34.
        if any(stride == 0 and size > 1 for stride, size in zip(x.stride(), x.shape)):
            # a broadcast view: its elements share memory, so a write past one item's end
            # would land on valid steps too; mask a copy instead
            return (run.zero_invalid(x),) + tuple(args[1:])
        x.masked_fill_(run.invalid_for(x), 0.0)
        return None

    return hook


def _conv_post_hook(run: _Run, geometry: _ConvTime) -> Callable:
    def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
        if geometry.keeps_length:
            return
        size_in, size_out = args[0].shape[-1], out.shape[-1]
        lengths = run.length(size_in)
        if geometry.out_length(size_in) != size_out:
            raise RuntimeError(f"masked adapter: unexpected conv output size {size_out} for {size_in}")
        run.register(size_out, geometry.out_length(lengths))

    return hook


class _Patch:
    """Install hooks and masked forwards for one call; restore the model afterwards."""

    def __init__(self, plan: _Plan, run: _Run) -> None:
        self.plan, self.run = plan, run
        self.handles: list[Any] = []
        self.saved: list[tuple[nn.Module, str, Any]] = []

    def _override(self, module: nn.Module, name: str, fn: Callable) -> None:
        # an instance attribute shadows the class method; remember any earlier one
        self.saved.append((module, name, module.__dict__.get(name, _MISSING)))
        object.__setattr__(module, name, fn)

    def __enter__(self) -> _Patch:
        run = self.run
        try:
            for conv, geometry in self.plan.convs:
                self.handles.append(conv.register_forward_pre_hook(_conv_pre_hook(run, geometry)))
                self.handles.append(conv.register_forward_hook(_conv_post_hook(run, geometry)))
            for module, key in self.plan.replaced:
                fn = _FORWARDS[key]
                self._override(module, "forward", lambda x, _m=module, _f=fn: _f(run, _m, x))
            for module, method in self.plan.methods:
                if method == "SimAM":
                    lam = _method_default(type(module), "SimAM", "lambda_p")
                    self._override(module, "SimAM", _simam(run, module, lam))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module, name, previous in reversed(self.saved):
            if previous is _MISSING:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, previous)
        self.saved.clear()


_MISSING = object()
_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _model_lock(model: nn.Module) -> threading.Lock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.Lock()
        return lock


def build_masked_adapter(model: nn.Module, *, verify_feat_dim: int | None = None,
                         min_cosine: float = 0.99999) -> MaskedAdapter | None:
    """A function ``(feats [B, T, F] padded, lengths [B]) -> embeddings [B, D]`` that equals
    running each ``feats[i, :lengths[i]]`` alone through `model`, or None when the
    architecture is not one the masked run supports (see `unsupported_reason`).

    The output is what the model returns (its last element when it returns a tuple).
    `model` must be in eval mode when the adapter is called. Padding values in `feats`
    are ignored (zeroed). An item too short for the network gives a NaN row, as the
    single-item model gives NaN (or fails) for it.

    With `verify_feat_dim`, the adapter is also checked once on random features of that
    dimension against single-item runs (a few short mixed lengths, on the model's device);
    below `min_cosine` the function returns None. Use it when the installed WeSpeaker may
    differ from the audited version.
    """
    try:
        plan = _plan(model)
    except UnsupportedModel:
        return None
    lock = _model_lock(model)
    modules = plan.modules

    def adapter(feats: Tensor, lengths: Tensor) -> Tensor:
        if feats.dim() != 3:
            raise ValueError(f"feats must be [B, T, F], got shape {tuple(feats.shape)}")
        # lengths on the CPU (a no-op for the usual caller): see _Run
        lengths = torch.as_tensor(lengths).to("cpu", torch.long).reshape(-1)
        if lengths.shape[0] != feats.shape[0]:
            raise ValueError("one length per item expected")
        if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > feats.shape[1]):
            raise ValueError("lengths must lie in [1, T]")
        if any(m.training for m in modules):
            raise RuntimeError("the masked adapter needs the model in eval mode")
        with lock, torch.inference_mode():
            run = _Run(lengths, feats.shape[1], feats.device)
            # [B, T, F]: zero past each end so the first conv sees what a lone item sees
            x = feats.masked_fill(run.invalid(feats.shape[1])[:, :, None], 0.0)
            with _Patch(plan, run):
                out = model(x)
        return out[-1] if isinstance(out, (tuple, list)) else out

    if verify_feat_dim is not None:
        if check_masked_adapter(model, adapter, verify_feat_dim) < min_cosine:
            return None
    return adapter


def pad_batch(feats: Sequence[np.ndarray | Tensor], *, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Stack [T_i, F] feature matrices into a zero-padded [B, max T, F] tensor plus the
    [B] long tensor of their lengths, in the given order (the adapter does not need
    sorted input; sorting by length only reduces the padding the caller pays for)."""
    if not feats:
        raise ValueError("empty batch")
    tensors = [torch.as_tensor(np.asarray(f) if not isinstance(f, Tensor) else f) for f in feats]
    dims = {t.shape[1] for t in tensors}
    if any(t.dim() != 2 for t in tensors) or len(dims) != 1:
        raise ValueError("every item must be a [T, F] matrix with the same F")
    lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.long)
    out = torch.zeros(len(tensors), int(lengths.max()), dims.pop(), dtype=dtype)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t.to(dtype)
    if device is not None:
        out, lengths = out.to(device), lengths.to(device)
    return out, lengths


def _single(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out[-1] if isinstance(out, (tuple, list)) else out


def check_masked_adapter(model: nn.Module, adapter: MaskedAdapter, feat_dim: int,
                         lengths: Sequence[int] = (120, 121, 122, 123, 160), *,
                         seed: int = 0) -> float:
    """Smallest cosine between the adapter's padded-batch embeddings and single-item runs
    on random features (a self-test; NaN counts as 0). Runs in the model's parameter
    dtype: for an fp16/bf16 model expect ~0.999, not 0.99999."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(seed)
    items = [torch.randn(n, feat_dim, generator=gen) for n in lengths]
    feats, lens = pad_batch(items, device=device, dtype=dtype)
    # cuDNN convs default to TF32, whose rounding (not the masking) differs between batch
    # shapes; the check is about masking, so compare with full fp32 convs
    tf32 = torch.backends.cudnn.allow_tf32
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            batch = adapter(feats, lens).float()
            single = torch.cat([_single(model, it[None].to(device=device, dtype=dtype)) for it in items]).float()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    cos = F.cosine_similarity(batch, single, dim=1)
    return float(torch.nan_to_num(cos, nan=0.0).min())
