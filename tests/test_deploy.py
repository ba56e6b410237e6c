"""Deployed mode: packed CPU kernels equal their formats, and the deployed model equals the fake-quant one."""

import copy

import pytest
import torch

from harness.evaluate.deploy import (
    DeploymentMismatch,
    bf16_copy,
    bf16_ulp,
    check_linears,
    check_perplexity,
    deploy,
    mismatch,
)
from harness.spec import DeploySpec
from methods import METHODS
from methods.core.quantizers import DynamicQuantizer, WeightQuantizer
from qkernels.cpu_packed import Int4CPUWeight, Int8CPUWeight, IntGemmCPUWeight, int4_kernel_group
from tests.compose import quantize


def _weight(rows=48, cols=192, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def _x(cols=192, tokens=5):
    return torch.randn(tokens, cols, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("group, sym", [(32, False), (128, False), (None, True), (None, False), (64, True)])
def test_int4_kernel_equals_the_dequantized_weight(group, sym):
    """192 columns with g128 is 1.5 groups: the kernel runs groups of 64 repeating each group's scale/offset."""
    skew = 0.0 if sym else 0.1  # asymmetric groups far from zero-centred: zero points far from 8
    qweight = WeightQuantizer(4, group, sym=sym).quantize(_weight() + skew)
    assert sym or (qweight.zeros - 8).abs().mean() > 3
    kernel = Int4CPUWeight.from_quantized(qweight)
    assert kernel is not None and kernel.kernel_group == int4_kernel_group(group or 192, 192)
    x = _x()
    expected = x @ qweight.dequantize().T
    out = kernel.matmul(x).float()
    assert (out - expected).abs().max() < 0.02 * expected.abs().max()  # bf16 activations and scales


def test_int4_kernel_refuses_what_it_cannot_run():
    assert Int4CPUWeight.from_quantized(WeightQuantizer(3, 32).quantize(_weight())) is None  # 3-bit codes
    assert Int4CPUWeight.from_quantized(WeightQuantizer(4, 48).quantize(_weight())) is None  # 48: no kernel group
    assert int4_kernel_group(128, 200) is None and int4_kernel_group(128, 576) == 64


def test_int8_kernel_equals_the_dequantized_weight_and_needs_a_symmetric_per_channel_grid():
    qweight = WeightQuantizer(8, None, sym=True).quantize(_weight())
    x = _x()
    expected = x @ qweight.dequantize().T
    out = Int8CPUWeight.from_quantized(qweight).matmul(x).float()
    assert (out - expected).abs().max() < 0.01 * expected.abs().max()
    assert Int8CPUWeight.from_quantized(WeightQuantizer(8, 64, sym=True).quantize(_weight())) is None
    assert Int8CPUWeight.from_quantized(WeightQuantizer(8, None, sym=False).quantize(_weight())) is None


@pytest.mark.parametrize("w_bits, a_bits, sym, clip", [(4, 4, True, 0.9), (4, 4, False, 1.0), (4, 8, True, 1.0)])
def test_integer_gemm_equals_fake_quantized_activations_times_weights(w_bits, a_bits, sym, clip):
    qweight = WeightQuantizer(w_bits, None, sym=sym).quantize(_weight())
    kernel = IntGemmCPUWeight.from_quantized(qweight, a_bits, clip)
    x = _x()
    expected = DynamicQuantizer(a_bits, True, clip)(x) @ qweight.dequantize().T
    torch.testing.assert_close(kernel.matmul(x), expected, rtol=1e-4, atol=1e-5)
    assert IntGemmCPUWeight.from_quantized(WeightQuantizer(4, 64).quantize(_weight()), 4, 1.0) is None


CASES = [
    ("rtn", "w4g32a16kv16", {}, "int4pack-cpu"),
    ("rtn", "w4a16kv16", {"w_sym": True}, "int4pack-cpu"),
    ("rtn", "w8a16kv16", {"w_sym": True}, "int8pack-cpu"),
    ("rtn", "w4a4kv16", {}, "int-gemm-cpu"),
    ("quarot", "w4a4kv4", {"weights": "rtn"}, "int-gemm-cpu"),
]


@pytest.mark.parametrize("method, bits, params, kernel", CASES)
def test_deployed_model_equals_the_fake_quant_model(tiny, method, bits, params, kernel):
    from harness.evaluate.perplexity import perplexity

    """The deployed model's logits differ from the fake-quant model's in bf16 by no more than bf16 arithmetic
    itself moves them (fake-quant bf16 vs fp32; 4-bit activations flip codes on such noise, so both are ~6% on
    a random model with a16 ~0.5%); a wrong scale or offset mapping gives ~100%."""
    model, _ = tiny
    quantize(model, method, METHODS[method].make_config(method, params), bits)
    reference = bf16_copy(model)
    fp32 = copy.deepcopy(model)
    summary = deploy(model)
    assert summary.on_kernel == {kernel: summary.linears_total} and not summary.fallback
    ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logits, dep_logits, fp32_logits = (m(ids).logits.float() for m in (reference, model, fp32))
    bf16_noise = (ref_logits - fp32_logits).norm() / fp32_logits.norm()
    assert (dep_logits - ref_logits).norm() / ref_logits.norm() < 1.5 * bf16_noise
    ppl_ref, ppl_dep = perplexity(reference, ids, 128).ppl, perplexity(model, ids, 128).ppl
    assert check_perplexity(ppl_dep, ppl_ref, 0.001) <= 0.001


def test_a_format_without_a_kernel_keeps_its_fake_quant_path(tiny):
    model, _ = tiny
    quantize(model, "rtn", METHODS["rtn"].make_config("rtn", {}), "w2g32a16kv16")
    summary = deploy(model)
    assert summary.linears_on_kernel == 0 and summary.fallback == {"w2 g32 weight-only": summary.linears_total}


def test_a_perplexity_mismatch_fails_with_a_message_naming_the_cause():
    with pytest.raises(DeploymentMismatch, match="packed format or kernel"):
        check_perplexity(10.1, 10.0, 0.001)


def test_bf16_ulp_is_the_spacing_of_bfloat16_numbers():
    values = torch.tensor([1.0, 1.9, 2.0, -3.0, 0.0, 2.0**-10])
    expected = torch.tensor([2.0**-7, 2.0**-7, 2.0**-6, 2.0**-6, 0.0, 2.0**-17])
    assert torch.equal(bf16_ulp(values), expected)
    one = torch.tensor([1.0], dtype=torch.bfloat16)
    assert (torch.nextafter(one, one + 1) - one).item() == bf16_ulp(one).item()


def _ids(model, tokens=256):
    return torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "method, bits, params",
    [("rtn", "w4a4kv16", {}), ("rtn", "w8a8kv16", {"w_sym": True}), ("quarot", "w4a4kv4", {"weights": "rtn"})],
)
def test_every_integer_gemm_linear_is_its_fake_quant_linear_rounded_once_to_bf16(tiny, method, bits, params):
    """Integer arithmetic then one fp32 rescale: each output is the reference rounded to bf16, ≤ ½ ulp (measured
    0.497–0.498 here), whatever the model's PPL does downstream."""
    model, _ = tiny
    quantize(model, method, METHODS[method].make_config(method, params), bits)
    summary = deploy(model)
    assert summary.quantizes_activations
    check = check_linears(model, summary.swapped, _ids(model))
    assert check.linears == summary.linears_total == 14
    assert check.max_ulps <= 0.5 + 1e-3


@pytest.mark.parametrize("bug", ["scale 1% high", "zero offset off by one", "activation clip 0.9 vs 1.0"])
def test_the_per_linear_check_catches_a_kernel_that_does_not_match_its_format(tiny, bug):
    model, _ = tiny
    quantize(model, "rtn", METHODS["rtn"].make_config("rtn", {}), "w4a4kv16")
    summary = deploy(model)
    name, (deployed, _) = next(iter(summary.swapped.items()))
    if bug == "scale 1% high":
        deployed.kernel.scales = deployed.kernel.scales * 1.01
    elif bug == "zero offset off by one":
        deployed.kernel.zero_offsets = deployed.kernel.zero_offsets + 1
    else:
        deployed.kernel.act_clip = 0.9
    check = check_linears(model, summary.swapped, _ids(model))
    assert check.worst == name and check.max_ulps > 1.0
    metrics = {"deploy.linear_max_ulps": check.max_ulps, "deploy.ppl": 10.0, "deploy.fake_bf16_ppl": 10.0}
    tags = {"deploy.linear_worst": check.worst, "deploy.gate": "per-linear"}
    assert name in mismatch(metrics, tags, DeploySpec())


def test_the_perplexity_gates_weight_only_formats_and_not_activation_quantized_ones():
    """Weight-only kernels compute in bf16 with bf16 scales and offsets (tiny-llama int4 g32: up to 76 ulps off per
    linear; SmolLM2 int4 g128: 0.016% in PPL), so PPL is their gate. A 0.5% PPL gap with every linear within ½ ulp
    is the cascade of flipped activation codes measured on SmolLM2 for correct W8A8 kernels: a failure for a
    weight-only format (no codes to flip), not for W8A8."""
    metrics = {"deploy.linear_max_ulps": 0.5, "deploy.ppl": 20.1, "deploy.fake_bf16_ppl": 20.0}
    assert mismatch(metrics, {"deploy.gate": "per-linear", "deploy.linear_worst": "x"}, DeploySpec()) is None
    reason = mismatch(metrics, {"deploy.gate": "perplexity", "deploy.linear_worst": "x"}, DeploySpec())
    assert "packed format or kernel" in reason and "0.500%" in reason
    metrics.update({"deploy.ppl": 20.01, "deploy.linear_max_ulps": 76.0})  # int4 g32's bf16 offsets, measured
    assert mismatch(metrics, {"deploy.gate": "perplexity", "deploy.linear_worst": "x"}, DeploySpec()) is None


def test_a_model_mixing_both_kinds_is_checked_per_linear_on_its_activation_quantized_linears(tiny):
    """A linear without an activation quantizer goes to a weight-only kernel (bf16 arithmetic, many ulps): it must
    not fail the per-linear gate that its activation-quantized neighbours pass."""
    model, _ = tiny
    quantize(model, "rtn", METHODS["rtn"].make_config("rtn", {"w_sym": True}), "w4a4kv16")
    first = next(m for m in model.modules() if getattr(m, "act_quant", None) is not None)
    first.act_quant = None
    summary = deploy(model)
    assert summary.on_kernel == {"int-gemm-cpu": 13, "int4pack-cpu": 1}
    gated = summary.activation_quantized
    assert len(gated) == 13 and summary.quantizes_activations
    assert check_linears(model, gated, _ids(model)).max_ulps <= 0.5 + 1e-3
