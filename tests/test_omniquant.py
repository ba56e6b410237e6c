"""OmniQuant (methods/omniquant.py): its learnable weight clipping (methods/core/lwc.py) and learnable equivalent
transformation (methods/core/let.py)."""

import pytest
import torch

from methods import omniquant
from methods.act.rtn import RTNActConfig
from methods.act.rtn import build as build_act
from methods.base import QuantContext, Request, UnsupportedBits
from methods.core.arch import ARCHS, decoder_linears
from methods.core.bits import BitSpec
from methods.core.calibrate import capture_block_inputs
from methods.core.let import attach_let, fold_let, record_input_maxima, smoothquant_scale
from methods.core.lwc import LWCQuantizer
from methods.core.qat import prepare
from methods.core.qlinear import QLinear
from methods.core.quantizers import WeightQuantizer


def _weight(rows=48, cols=200, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_an_unclipped_start_is_the_asymmetric_min_max_grid():
    weight = _weight()
    unclipped = LWCQuantizer(weight, 3, 64, init=40.0)  # σ(40) = 1 in fp32: no clipping
    reference = WeightQuantizer(3, 64, sym=False).quantize(weight)
    assert torch.allclose(unclipped.freeze(weight).dequantize(), reference.dequantize(), atol=1e-7)


def test_fake_quant_equals_the_frozen_format_with_a_partial_last_group():
    weight = _weight(cols=200)  # groups of 64: 3 full and one of 8 inside each row
    quantizer = LWCQuantizer(weight, 2, 64)
    with torch.no_grad():
        quantizer.upper.uniform_(0.0, 4.0)
        quantizer.lower.uniform_(0.0, 4.0)
    frozen = quantizer.freeze(weight)
    assert frozen.scales.shape == (48, 4) and frozen.codes.max() <= 3
    assert torch.equal(quantizer(weight), frozen.dequantize())


def test_the_clip_logits_receive_gradients_through_the_step():
    weight = _weight()
    quantizer = LWCQuantizer(weight, 4, 64)
    (quantizer(weight) - weight).pow(2).sum().backward()
    assert quantizer.upper.grad.abs().sum() > 0 and quantizer.lower.grad.abs().sum() > 0


def test_weight_activation_bits_are_refused_on_gemma3_only():
    with pytest.raises(UnsupportedBits, match="built for the Llama family"):
        omniquant.supports(Request(BitSpec.parse("w4a4kv16"), ARCHS["gemma3"]))
    omniquant.supports(Request(BitSpec.parse("w4a4kv16"), ARCHS["llama"]))
    omniquant.supports(Request(BitSpec.parse("w3g64a16kv16"), ARCHS["gemma3"]))


def _block_output(block, hidden, kwargs):
    with torch.no_grad():
        out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def test_let_with_any_scales_leaves_the_fp_block_unchanged_before_and_after_folding(tiny):
    """Random positive and negative scales on all four pairs (GQA: 4 query / 2 KV heads; RoPE): with the weight
    quantizers off, the transformed block and the folded block compute the original one."""
    model, _ = tiny
    arch = ARCHS["llama"]
    windows = [torch.randint(0, 250, (1, 48), generator=torch.Generator().manual_seed(2))]
    start, block_kwargs = capture_block_inputs(model, windows, 1)
    block, kwargs, hidden = arch.layers(model)[0], block_kwargs[0][0], start.hidden[0]
    reference = _block_output(block, hidden, kwargs)
    prepare(model, lambda name, weight: LWCQuantizer(weight, 4, None))
    for module in block.modules():
        if isinstance(module, LWCQuantizer):
            module.enabled = False
    maxima, handles = record_input_maxima(block, arch)
    _block_output(block, hidden, kwargs)
    for handle in handles:
        handle.remove()
    let = attach_let(block, arch, model.config, maxima, alpha=0.5)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for scale in (let.s_qkv, let.s_fc1, let.s_out, let.s_qk):
            scale.copy_(torch.empty(scale.shape).uniform_(0.3, 3.0, generator=generator))
        let.s_fc1[0] = -0.7  # a negative scale is an equivalence too
    torch.testing.assert_close(_block_output(block, hidden, kwargs), reference, rtol=1e-4, atol=1e-5)
    fold_let(block, arch)
    assert not hasattr(block, "let") and isinstance(block.input_layernorm, type(arch.attention_norm(block)))
    torch.testing.assert_close(_block_output(block, hidden, kwargs), reference, rtol=1e-4, atol=1e-5)


def test_the_starting_scales_are_smoothquants():
    act_max = torch.tensor([4.0, 1.0, 0.0])
    weight = torch.tensor([[1.0, -2.0, 0.5], [-0.5, 1.0, 0.25]])
    expected = torch.tensor([4.0**0.5 / 1.0**0.5, 1.0 / 2.0**0.5, 1e-5**0.5 / 0.5**0.5])
    torch.testing.assert_close(smoothquant_scale(act_max, [weight], 0.5), expected)


def _w4a4_block_mse(let: bool) -> tuple[list[tuple[float, float]], object]:
    from harness.models import tiny_llama

    model, _ = tiny_llama(seed=0)
    generator = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 250, (1, 64), generator=generator) for _ in range(4)]
    ctx = QuantContext(seed=0, calibration=lambda: windows, act=build_act(RTNActConfig(), 4))
    config = omniquant.OmniQuantConfig(epochs=10, let=let)
    summary = omniquant.quantize(model, config, BitSpec.parse("w4a4kv16"), ctx)
    rows = [line.split("\t") for line in summary.artifacts["omniquant_block_mse.tsv"].splitlines()[1:]]
    return [(float(first), float(last)) for _, first, last in rows], model


def test_at_w4a4_let_lowers_each_blocks_error_below_clipping_alone():
    """The point of LET (the paper's W4A4 ablation): with 4-bit activations in the loop, learning the clip alone
    barely moves the block error; learning the equivalent transformation with it lowers it in every block."""
    with_let, model = _w4a4_block_mse(let=True)
    clip_only, _ = _w4a4_block_mse(let=False)
    assert len(with_let) == len(clip_only) == 2
    assert all(last < first for first, last in with_let)
    assert all(a[1] < b[1] for a, b in zip(with_let, clip_only, strict=True))
    assert not hasattr(ARCHS["llama"].layers(model)[0], "let") and not any(p.requires_grad for p in model.parameters())
    assert all(isinstance(linear, QLinear) and linear.qweight.bits == 4 for _, _, _, linear in decoder_linears(model))


def test_block_training_lowers_each_blocks_error_and_freezes_to_integer_grids(tiny):
    model, _ = tiny
    generator = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 250, (1, 64), generator=generator) for _ in range(4)]
    ctx = QuantContext(seed=0, calibration=lambda: windows)
    config = omniquant.OmniQuantConfig(epochs=5)
    summary = omniquant.quantize(model, config, BitSpec.parse("w2g32a16kv16"), ctx)
    rows = [line.split("\t") for line in summary.artifacts["omniquant_block_mse.tsv"].splitlines()[1:]]
    assert len(rows) == 2 and all(float(last) < float(first) for _, first, last in rows)
    for _, _, _, linear in decoder_linears(model):
        assert isinstance(linear, QLinear) and linear.qweight.bits == 2 and linear.qweight.group_size == 32
        assert not any(p.requires_grad for p in linear.parameters())
