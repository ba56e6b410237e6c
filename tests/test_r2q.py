"""R2Q (methods/core/r2q.py; reconstructed from the public description): the greedy residual binarization, its
gradients, its stored form, and the quantizer in both QAT frameworks (ParetoQ's trainer, BitDistiller's)."""

import itertools
from dataclasses import replace

import pytest
import torch

from harness.models import byte_tokenizer, tiny_llama
from harness.spec import BitSpec
from methods import METHODS, bitdistiller, paretoq
from methods.base import QuantContext, Request, UnsupportedBits
from methods.core.arch import ARCHS, decoder_linears
from methods.core.clip_search import pad_groups_replicating
from methods.core.formats import LUTWeight
from methods.core.r2q import R2QWeightQuantizer, greedy_fake_quant, greedy_scales
from tests.test_bitdistiller import _ctx as _bitdistiller_ctx  # BitDistiller's tiny corpus and prompts


def test_greedy_initialisation_on_hand_made_rows():
    """[3, 1, −1, −3]: α1 = mean|w| = 2, the residual ±1 gives α2 = 1, levels ±2 ± 1 = {−3, −1, 1, 3}: exact.
    [4, 0.5, −1, −2]: α1 = 7.5/4 = 1.875, residual [2.125, −1.375, 0.875, −0.125] gives α2 = 4.5/4 = 1.125."""
    rows = torch.tensor([[3.0, 1.0, -1.0, -3.0], [4.0, 0.5, -1.0, -2.0]])
    alpha1, alpha2 = greedy_scales(rows[:, None, :])
    assert alpha1.flatten().tolist() == [2.0, 1.875] and alpha2.flatten().tolist() == [1.0, 1.125]
    expected = torch.tensor([[3.0, 1.0, -1.0, -3.0], [3.0, 0.75, -0.75, -3.0]])
    assert torch.equal(greedy_fake_quant(rows[:, None, :])[:, 0], expected)
    quantizer = R2QWeightQuantizer(rows)
    frozen = quantizer.freeze(rows)
    assert frozen.codes.tolist() == [[3, 2, 1, 0], [3, 2, 1, 0]]  # 2·[s1 > 0] + [s2 > 0]
    levels = quantizer.levels()
    assert torch.equal(levels, -levels.flip(-1))  # symmetric around 0
    assert torch.equal(levels[0, 0], torch.tensor([-3.0, -1.0, 1.0, 3.0]))
    assert torch.equal(frozen.dequantize(), expected) and torch.equal(quantizer(rows).detach(), expected)


def test_groups_have_their_own_pair_and_the_partial_group_replicates_its_last_weight():
    weight = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    quantizer = R2QWeightQuantizer(weight, group=16)
    assert quantizer.alpha1.shape == (3, 3, 1)  # 40 = 16 + 16 + 8 (padded to 16 with copies of the last weight)
    grouped = pad_groups_replicating(weight, 16)
    expected = greedy_fake_quant(grouped).reshape(3, -1)[:, :40]
    assert torch.allclose(quantizer(weight), expected)
    frozen = quantizer.freeze(weight)
    assert isinstance(frozen, LUTWeight) and frozen.levels.shape == (3, 3, 4)
    assert torch.allclose(frozen.dequantize(), expected, rtol=1e-3)  # the stored fp16 levels
    assert frozen.storage_bits() == 3 * 40 * 2 + 3 * 3 * 4 * 16  # codes + a 4-level fp16 table per group


def test_scale_gradients_match_finite_differences_and_the_weight_passes_straight_through_inside_the_span():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 32, generator=gen, dtype=torch.float64)
    weight[0, 0] = 10.0  # far outside any lattice span: no gradient reaches it
    cotangent = torch.randn(4, 32, generator=gen, dtype=torch.float64)
    quantizer = R2QWeightQuantizer(weight, group=16).double()
    quantizer.alpha1.data *= 0.8  # away from the greedy point, so the span clips some weights
    latent = weight.clone().requires_grad_(True)
    (quantizer(latent) * cotangent).sum().backward()
    for name in ("alpha1", "alpha2"):
        param = getattr(quantizer, name)
        eps = 1e-6
        numeric = torch.zeros_like(param)
        for index in itertools.product(*(range(n) for n in param.shape)):
            with torch.no_grad():
                param[index] += eps
                up = (quantizer(weight) * cotangent).sum()
                param[index] -= 2 * eps
                down = (quantizer(weight) * cotangent).sum()
                param[index] += eps
            numeric[index] = (up - down) / (2 * eps)
        assert torch.allclose(param.grad, numeric, atol=1e-6), name
    grouped = pad_groups_replicating(weight, 16)
    span = (quantizer.alpha1 + quantizer.alpha2).detach()
    inside = (grouped.abs() <= span).reshape(4, -1)[:, :32]
    assert not inside.all() and not inside[0, 0]
    assert torch.equal(latent.grad, cotangent * inside)


def _paretoq_ctx():
    ids = byte_tokenizer()("R2Q refines a binarization with a second one. " * 30).input_ids[: 8 * 32]
    windows = torch.tensor(ids).reshape(8, 32)
    return QuantContext(seed=0, calibration=lambda: [], training=lambda: windows)


def test_zero_steps_in_paretoq_is_greedy_residual_binarization_per_channel():
    model, _ = tiny_llama(seed=0)
    originals = {name: m.weight.detach().clone() for name, _, _, m in decoder_linears(model)}
    cfg = replace(paretoq.ParetoQConfig(), quantizer="r2q", loop=replace(paretoq.ParetoQConfig().loop, steps=0))
    paretoq.quantize(model, cfg, BitSpec.parse("w2a16kv16"), _paretoq_ctx())
    for name, _, _, module in decoder_linears(model):
        expected = greedy_fake_quant(originals[name][:, None, :])[:, 0]
        assert isinstance(module.qweight, LUTWeight), name
        assert torch.allclose(module.weight.float(), expected, rtol=1e-3, atol=1e-6), name


def test_paretoq_trains_the_scales_and_refuses_r2q_off_two_bits():
    model, _ = tiny_llama(seed=0)
    loop = replace(paretoq.ParetoQConfig().loop, steps=2, lr=1e-2)
    cfg = replace(paretoq.ParetoQConfig(), quantizer="r2q", loop=loop)
    before = R2QWeightQuantizer(model.model.layers[0].mlp.down_proj.weight.detach().float()).levels()
    summary = paretoq.quantize(model, cfg, BitSpec.parse("w2a16kv16"), _paretoq_ctx())
    after = model.model.layers[0].mlp.down_proj.qweight.levels.float()
    assert summary.metrics["train_steps"] == 2 and not torch.allclose(after, before, rtol=1e-3)
    with pytest.raises(ValueError, match="quantizer=r2q is a 2-bit quantizer"):
        paretoq.quantize(tiny_llama(seed=0)[0], cfg, BitSpec.parse("w3a16kv16"), _paretoq_ctx())
    with pytest.raises(ValueError, match="quantizer must be one of paretoq, r2q"):
        paretoq.quantize(
            tiny_llama(seed=0)[0], replace(cfg, quantizer="nf"), BitSpec.parse("w2a16kv16"), _paretoq_ctx()
        )


def test_method_r2q_is_bitdistiller_with_the_r2q_quantizer(tmp_path):
    """Zero steps without the clip search: greedy residual binarization per group of the FP weights (the PTQ
    row); with training, α1/α2 move (they are in the trained group) and the result is the LUT format."""
    bits = BitSpec.parse("w2g32a16kv16")
    cfg = METHODS["r2q"].config_cls()
    assert isinstance(cfg, bitdistiller.BitDistillerConfig) and cfg.quant_type == "r2q"
    model, _ = tiny_llama(seed=0)
    originals = {name: m.weight.detach().clone() for name, _, _, m in decoder_linears(model)}
    bitdistiller.quantize(
        model, replace(cfg, clip=False, loop=replace(cfg.loop, steps=0)), bits, _bitdistiller_ctx(tmp_path)
    )
    for name, _, _, module in decoder_linears(model):
        rows, cols = originals[name].shape
        expected = greedy_fake_quant(originals[name].reshape(rows, -1, 32)).reshape(rows, cols)
        assert torch.allclose(module.weight.float(), expected, rtol=1e-3, atol=1e-6), name
    from methods.core.selfdistill import GenerationSettings

    trained, _ = tiny_llama(seed=0)
    generation = GenerationSettings(max_prompts=2, max_new_tokens=24)
    run = replace(cfg, clip=False, cakld_batches=1, generation=generation, loop=replace(cfg.loop, steps=2, lr=1e-2))
    summary = bitdistiller.quantize(trained, run, bits, _bitdistiller_ctx(tmp_path))
    assert summary.metrics["train_steps"] == 2
    moved = trained.model.layers[0].mlp.down_proj.qweight.levels.float()
    assert not torch.allclose(moved, model.model.layers[0].mlp.down_proj.qweight.levels.float(), rtol=1e-3)


@pytest.mark.parametrize("bits", ["w3g64a16kv16", "w4a16kv16", "w2a4kv4"])
def test_r2q_refuses_before_loading(bits):
    with pytest.raises(UnsupportedBits, match="r2q does not support|bitdistiller does not support"):
        METHODS["r2q"].supports(Request(BitSpec.parse(bits), ARCHS["llama"]))


@pytest.mark.parametrize("group", [None, 32])
def test_the_lut_kernel_on_the_packed_layout_equals_the_fake_quantized_linear(group):
    from qkernels import reference

    gen = torch.Generator().manual_seed(2)
    weight, x = torch.randn(48, 64, generator=gen), torch.randn(5, 64, generator=gen)
    quantizer = R2QWeightQuantizer(weight, group)
    frozen = quantizer.freeze(weight)
    assert frozen.kernel_format(16) is not None  # the format the latency step times
    fake = quantizer(weight).detach()  # fp32 scales; the stored table is fp16
    assert torch.allclose(frozen.dequantize(), fake, rtol=1e-3, atol=1e-6)
    assert torch.allclose(reference.lut_matmul(x, frozen.pack()), x @ frozen.dequantize().T, atol=1e-5)
