"""Masked padded inference: a padded batch of mixed lengths must give the embeddings each
item gets when run alone through the same WeSpeaker zoo model.

Models are tiny, randomly initialised and seeded; their BatchNorm statistics are
randomised too, because a fresh BatchNorm maps 0 to 0 and would hide exactly the bug the
masking exists for (eval-mode BN turns padding zeros into its bias).
"""

from __future__ import annotations

import sys
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embstore.models._wespeaker_import import import_wespeaker_models
from embstore.models.masked import (
    build_masked_adapter,
    check_masked_adapter,
    conv_output_length,
    pad_batch,
    unsupported_reason,
)

MIN_COSINE = 0.99999
MAX_REL_ERROR = 1e-4
FEAT_DIM = 40

speaker_model = import_wespeaker_models()
ws = sys.modules  # the zoo modules, imported by import_wespeaker_models
resnet = ws["wespeaker.models.resnet"]
ecapa = ws["wespeaker.models.ecapa_tdnn"]
campplus = ws["wespeaker.models.campplus"]
eres2net = ws["wespeaker.models.eres2net"]
res2net = ws["wespeaker.models.res2net"]
gemini = ws["wespeaker.models.gemini_dfresnet"]
tdnn = ws["wespeaker.models.tdnn"]
repvgg = ws["wespeaker.models.repvgg"]
samresnet = ws["wespeaker.models.samresnet"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these models are tiny: intra-op threads only add contention (10x slower on a busy
    # 2-core box), and results must not depend on the thread count anyway
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model.eval()


def _repvgg(block: str, use_se: bool, deploy: bool) -> nn.Module:
    model = repvgg.RepVGG(block=block, num_blocks=[1, 1, 1, 1], strides=[1, 1, 2, 2, 2],
                          base_width=8, width_multiplier=[1, 1, 1, 1], use_se=use_se,
                          feat_dim=FEAT_DIM, embed_dim=32, pooling_func="TSTP")
    if deploy:
        _randomise(model, 1)  # fuse non-trivial BN statistics into the deploy convs
        model = repvgg.repvgg_model_convert(model)
    return model


def _resnet(block: str, blocks: list[int], pooling: str, **kw) -> Callable[[], nn.Module]:
    return lambda: resnet.ResNet(getattr(resnet, block), blocks, m_channels=8, feat_dim=FEAT_DIM,
                                 embed_dim=32, pooling_func=pooling, **kw)


# name -> (factory, feature dim, shortest length the single-item model handles)
# Shortest lengths: three stride-2 time convs need 9 frames for 2 pooled frames (the
# unbiased std of one frame is NaN); the x-vector's unpadded convs eat 14 frames.
CASES: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "ResNet18-TSTP": (_resnet("BasicBlock", [2, 2, 2, 2], "TSTP"), FEAT_DIM, 9),
    "ResNet34-TSTP": (_resnet("BasicBlock", [3, 4, 6, 3], "TSTP"), FEAT_DIM, 9),
    "ResNet50-TSTP-two-emb": (_resnet("Bottleneck", [3, 4, 6, 3], "TSTP", two_emb_layer=True),
                                       FEAT_DIM, 9),
    "ResNet-TAP": (_resnet("BasicBlock", [1, 1, 1, 1], "TAP"), FEAT_DIM, 9),
    "ResNet-TSDP": (_resnet("BasicBlock", [1, 1, 1, 1], "TSDP"), FEAT_DIM, 9),
    "ResNet-ASTP": (_resnet("BasicBlock", [1, 1, 1, 1], "ASTP"), FEAT_DIM, 9),
    "ResNet-MHASTP": (_resnet("BasicBlock", [1, 1, 1, 1], "MHASTP"), FEAT_DIM, 9),
    "ResNet-MQMHASTP": (_resnet("BasicBlock", [1, 1, 1, 1], "MQMHASTP"), FEAT_DIM, 9),
    "ECAPA-ASTP": (lambda: ecapa.ECAPA_TDNN(channels=32, feat_dim=FEAT_DIM, embed_dim=32), FEAT_DIM, 2),
    "ECAPA-GLOB-ASTP-embbn": (lambda: ecapa.ECAPA_TDNN(channels=32, feat_dim=FEAT_DIM, embed_dim=32,
                                                       global_context_att=True, emb_bn=True), FEAT_DIM, 2),
    "ECAPA-TSTP": (lambda: ecapa.ECAPA_TDNN(channels=32, feat_dim=FEAT_DIM, embed_dim=32,
                                            pooling_func="TSTP"), FEAT_DIM, 2),
    # CAM++'s FCM head has a fixed 32 channels: fewer mel bins keep it fast
    "CAM++": (lambda: campplus.CAMPPlus(feat_dim=24, embed_dim=32, growth_rate=8, bn_size=2,
                                        init_channels=16), 24, 3),
    "ERes2Net": (lambda: eres2net.ERes2Net(8, [1, 2, 1, 1], feat_dim=FEAT_DIM, embed_dim=32,
                                           two_emb_layer=True), FEAT_DIM, 9),
    "Res2Net": (lambda: res2net.Res2Net(8, [1, 1, 1, 1], feat_dim=FEAT_DIM, embed_dim=32), FEAT_DIM, 9),
    # Gemini's stats_dim assumes feat_dim divisible by 16; one time stride only
    "Gemini-DF-ResNet": (lambda: gemini.Gemini_DF_ResNet([1, 1, 1, 1], [8, 8, 8, 16, 16], feat_dim=48,
                                                         embed_dim=32), 48, 3),
    "XVEC": (lambda: tdnn.XVEC(feat_dim=FEAT_DIM, hid_dim=32, stats_dim=64, embed_dim=32), FEAT_DIM, 16),
    "RepVGG-SE": (lambda: _repvgg("RepVGG", use_se=True, deploy=False), FEAT_DIM, 9),
    "RepVGG-SE-deploy": (lambda: _repvgg("RepVGG", use_se=True, deploy=True), FEAT_DIM, 9),
    "RepSPK": (lambda: _repvgg("RepSPK", use_se=False, deploy=False), FEAT_DIM, 9),
    "SimAM-ResNet34-ASP": (lambda: samresnet.SimAM_ResNet34_ASP(in_planes=8, embed_dim=32,
                                                                acoustic_dim=FEAT_DIM), FEAT_DIM, 9),
}


def _lengths(shortest: int) -> list[int]:
    # shortest..+3 (odd/even at every stride at the smallest sizes), 200..207 (every
    # residue mod 8 = three stride-2 layers), 251/333 (CAM++ context segments of 100
    # frames end mid-segment after its stride 2), and one long item that sets the padding
    return [shortest, shortest + 1, shortest + 2, shortest + 3, *range(200, 208), 251, 333, 400]


def _items(lengths: list[int], feat_dim: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, feat_dim, generator=gen) for n in lengths]


def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[-1] if isinstance(out, (tuple, list)) else out


def _single(model: nn.Module, items: list[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([_embed(model, item[None]) for item in items])


def _build(name: str) -> tuple[nn.Module, int, int]:
    factory, feat_dim, shortest = CASES[name]
    torch.manual_seed(0)
    return _randomise(factory(), 0), feat_dim, shortest


@pytest.mark.parametrize("name", list(CASES))
def test_masked_batch_equals_single_items(name: str) -> None:
    model, feat_dim, shortest = _build(name)
    adapter = build_masked_adapter(model)
    assert adapter is not None, unsupported_reason(model)
    items = _items(_lengths(shortest), feat_dim)
    feats, lengths = pad_batch(items)
    batch = adapter(feats, lengths)
    single = _single(model, items)
    assert batch.shape == single.shape
    cos = F.cosine_similarity(batch, single, dim=1)
    assert torch.isfinite(cos).all()
    assert float(cos.min()) >= MIN_COSINE, f"{name}: min cosine {float(cos.min()):.7f}"
    # cosine alone is too lenient for small leaks: ECAPA with its squeeze-excitation means
    # taken over the padding still reaches 0.999999, but is off by ~1e-3 relative, while
    # the exact run stays below 1e-5 (float rounding only)
    rel = (batch - single).norm(dim=1) / single.norm(dim=1)
    assert float(rel.max()) <= MAX_REL_ERROR, f"{name}: relative error {float(rel.max()):.1e}"


@pytest.mark.parametrize("name", ["ResNet-MQMHASTP", pytest.param("SimAM-ResNet34-ASP", marks=pytest.mark.exhaustive)])
def test_runs_under_bf16_autocast(name: str) -> None:
    # the extractor may run models under autocast; time reductions then run in fp32
    # (no fp16 overflow on long items), so the batch stays as close to the fp32 single
    # run as a bf16 single run is (0.9999 measured; bf16 single runs: 0.9986-0.9993)
    model, feat_dim, shortest = _build(name)
    adapter = build_masked_adapter(model)
    items = _items(_lengths(shortest), feat_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch = adapter(*pad_batch(items)).float()
    cos = F.cosine_similarity(batch, _single(model, items), dim=1)
    assert float(cos.min()) >= 0.999


def test_plain_zero_padding_is_not_exact() -> None:
    # the reason the adapter exists: the same batch without masks drifts measurably
    model, feat_dim, shortest = _build("ResNet34-TSTP")
    items = _items(_lengths(shortest), feat_dim)
    feats, _ = pad_batch(items)
    with torch.inference_mode():
        plain = _embed(model, feats)
    cos = F.cosine_similarity(plain, _single(model, items), dim=1)
    assert float(cos.min()) < 0.9999


def test_padding_values_are_ignored_and_order_kept() -> None:
    model, feat_dim, _ = _build("ResNet-ASTP")
    adapter = build_masked_adapter(model)
    items = _items([333, 17, 200, 101], feat_dim, seed=3)
    feats, lengths = pad_batch(items)
    garbage = feats.clone()
    for i, n in enumerate(lengths.tolist()):
        garbage[i, n:] = float("nan")
    a, b = adapter(feats, lengths), adapter(garbage, lengths)
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b)
    cos = F.cosine_similarity(a, _single(model, items), dim=1)
    assert float(cos.min()) >= MIN_COSINE


def test_model_is_left_untouched() -> None:
    model, feat_dim, _ = _build("ECAPA-ASTP")
    x = _items([150], feat_dim)[0][None]
    with torch.inference_mode():
        before = _embed(model, x)
    adapter = build_masked_adapter(model)
    adapter(*pad_batch(_items([150, 90], feat_dim)))
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert "forward" not in m.__dict__
    with torch.inference_mode():
        torch.testing.assert_close(_embed(model, x), before, rtol=0, atol=0)


def test_state_restored_after_an_error() -> None:
    model, feat_dim, _ = _build("SimAM-ResNet34-ASP")
    adapter = build_masked_adapter(model)
    with pytest.raises(RuntimeError):
        # wrong feature dimension: fails inside the model while hooks are installed
        adapter(*pad_batch(_items([50, 60], feat_dim + 8)))
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert "forward" not in m.__dict__ and "SimAM" not in m.__dict__


def test_too_short_item_only_spoils_its_own_row() -> None:
    # 10 frames leave nothing after the x-vector's 14 frames of context: NaN for that row
    model, feat_dim, _ = _build("XVEC")
    adapter = build_masked_adapter(model)
    items = _items([10, 120, 121], feat_dim)
    out = adapter(*pad_batch(items))
    assert not torch.isfinite(out[0]).all()
    cos = F.cosine_similarity(out[1:], _single(model, items[1:]), dim=1)
    assert float(cos.min()) >= MIN_COSINE


def test_broadcast_conv_input_is_masked_as_a_copy() -> None:
    # conv inputs are zeroed past each end in place; a broadcast view cannot be (its
    # steps share memory), so the hook must hand the conv a masked copy instead
    from embstore.models.masked import _ConvTime, _Run, _conv_pre_hook

    run = _Run(torch.tensor([2, 3]), 4, torch.device("cpu"))
    hook = _conv_pre_hook(run, _ConvTime(kernel=3, stride=1, padding=1, dilation=1, same=False))
    base = torch.ones(2, 3, 1)
    (masked,) = hook(None, (base.expand(2, 3, 4),))
    assert torch.equal(base, torch.ones(2, 3, 1))
    assert masked[0, :, 2:].eq(0).all() and masked[1, :, 3:].eq(0).all()
    assert masked[0, :, :2].eq(1).all() and masked[1, :, :3].eq(1).all()
    dense = torch.ones(2, 3, 4)
    assert hook(None, (dense,)) is None and torch.equal(dense, masked)


def test_needs_eval_mode() -> None:
    model, feat_dim, _ = _build("ResNet-TAP")
    adapter = build_masked_adapter(model)
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        adapter(*pad_batch(_items([50, 60], feat_dim)))


def test_bad_lengths_rejected() -> None:
    model, feat_dim, _ = _build("ResNet-TAP")
    adapter = build_masked_adapter(model)
    feats, lengths = pad_batch(_items([50, 60], feat_dim))
    with pytest.raises(ValueError):
        adapter(feats, lengths + 1)
    with pytest.raises(ValueError):
        adapter(feats, lengths[:1])


def test_unsupported_architectures_return_none() -> None:
    # not a zoo model at all
    plain = nn.Sequential(nn.Conv1d(FEAT_DIM, 8, 3, padding=1), nn.AdaptiveAvgPool1d(1)).eval()
    assert build_masked_adapter(plain) is None
    assert unsupported_reason(plain)
    # a zoo family the adapter does not know: x-vector with XI pooling (Bayesian, per-frame
    # precision weights with a prior frame; not implemented)
    xi = speaker_model.get_speaker_model("XI_VEC_XVEC")(feat_dim=FEAT_DIM, embed_dim=32).eval()
    assert build_masked_adapter(xi) is None
    assert "XI" in unsupported_reason(xi)
    # a supported family with an unknown time-mixing module spliced in
    model, _, _ = _build("ResNet-TAP")
    model.layer2[0].shortcut = nn.Sequential(nn.MaxPool2d(1), *model.layer2[0].shortcut)
    assert build_masked_adapter(model) is None
    # reflect padding makes the lone item see mirrored frames, not zeros
    model, _, _ = _build("ResNet-TAP")
    model.conv1.padding_mode = "reflect"
    assert build_masked_adapter(model) is None


def test_self_check_passes_for_supported_model() -> None:
    model, feat_dim, _ = _build("ECAPA-ASTP")
    adapter = build_masked_adapter(model, verify_feat_dim=feat_dim)
    assert adapter is not None
    assert check_masked_adapter(model, adapter, feat_dim) >= MIN_COSINE


def test_self_check_catches_a_wrong_adapter() -> None:
    model, feat_dim, _ = _build("ResNet-TSDP")

    def unmasked(feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return _embed(model, feats)

    assert check_masked_adapter(model, unmasked, feat_dim) < MIN_COSINE


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), (1, 2, 0, 1), (5, 2, 2, 1), (5, 1, 0, 1), (3, 1, 0, 3), (3, 1, 2, 2),
])
def test_conv_output_length_matches_torch(kernel: int, stride: int, padding: int, dilation: int) -> None:
    conv = nn.Conv1d(1, 1, kernel, stride=stride, padding=padding, dilation=dilation)
    for n in range(8, 40):
        assert conv(torch.zeros(1, 1, n)).shape[-1] == conv_output_length(n, kernel, stride, padding, dilation)


def test_pad_batch_layout() -> None:
    items = _items([3, 5, 4], 2)
    feats, lengths = pad_batch([i.numpy() for i in items])
    assert feats.shape == (3, 5, 2) and lengths.tolist() == [3, 5, 4]
    for i, item in enumerate(items):
        torch.testing.assert_close(feats[i, : len(item)], item)
        assert not feats[i, len(item):].any()


def test_wespeaker_import_skips_package_inits() -> None:
    assert speaker_model.get_speaker_model("ResNet34") is resnet.ResNet34
    # the real wespeaker/__init__ (which imports the CLI: silero_vad, torchaudio) never ran:
    # the package module is the file-less stand-in
    assert getattr(sys.modules["wespeaker"], "__file__", None) is None
    assert "silero_vad" not in sys.modules
    assert import_wespeaker_models() is speaker_model
