"""OmniQuant weight-only (methods/omniquant.py) and its learnable weight clipping (methods/core/lwc.py)."""

import pytest
import torch

from methods import omniquant
from methods.base import QuantContext, Request, UnsupportedBits
from methods.core.arch import ARCHS, decoder_linears
from methods.core.bits import BitSpec
from methods.core.lwc import LWCQuantizer
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


def test_weight_activation_bits_are_refused_before_loading():
    request = Request(BitSpec.parse("w4a4kv16"), ARCHS["llama"])
    with pytest.raises(UnsupportedBits, match="omniquant: weight-only"):
        omniquant.supports(request)
    omniquant.supports(Request(BitSpec.parse("w3g64a16kv16"), ARCHS["llama"]))


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
