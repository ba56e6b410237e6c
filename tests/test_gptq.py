import pytest
import torch

from methods.core.gptq import gptq_quantize, reconstruction_error
from methods.core.quantizers import WeightQuantizer


def _problem(rows=48, cols=80, tokens=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=gen) @ mix  # correlated inputs: where GPTQ's updates matter
    x[:, 3] *= 8  # an outlier channel
    w = torch.randn(rows, cols, generator=gen)
    return w, (2.0 / tokens) * (x.T @ x).double()


@pytest.mark.parametrize(
    "bits, group, sym, act_order",
    [(4, None, False, False), (3, 32, False, False), (2, 32, True, False), (3, 32, False, True), (4, 48, True, True)],
)
def test_gptq_never_worse_than_rtn_on_its_objective(bits, group, sym, act_order):
    w, h = _problem()
    quantizer = WeightQuantizer(bits, group, sym=sym)
    q = gptq_quantize(w, h, quantizer, act_order=act_order, block_size=32)
    assert q.codes.shape == w.shape and q.scales.shape[1] == -(-80 // (group or 80))
    gptq_err = reconstruction_error(w, q.dequantize(), h)
    rtn_err = reconstruction_error(w, quantizer.quantize(w).dequantize(), h)
    assert gptq_err < rtn_err


def test_gptq_at_8_bits_is_close_to_fp():
    w, h = _problem()
    q = gptq_quantize(w, h, WeightQuantizer(8, None))
    rel = reconstruction_error(w, q.dequantize(), h) / reconstruction_error(w, torch.zeros_like(w), h)
    assert rel < 1e-4


def test_codes_and_grids_reproduce_the_weights():
    w, h = _problem()
    q = gptq_quantize(w, h, WeightQuantizer(3, 32), act_order=True)
    # Every dequantized value lies on its group's grid: re-quantizing with the stored grids is exact.
    grid_codes = torch.round(
        q.dequantize() / q.scales.repeat_interleave(32, 1)[:, :80] + q.zeros.repeat_interleave(32, 1)[:, :80]
    )
    assert torch.equal(grid_codes, q.codes.float())


def test_dead_inputs_get_zero_weight():
    w, h = _problem()
    h[5, :] = 0
    h[:, 5] = 0
    q = gptq_quantize(w, h, WeightQuantizer(4, None, sym=True))
    assert torch.all(q.dequantize()[:, 5] == 0)


def test_fp32_solve_matches_the_fp64_solve():
    """The reference code solves in fp32; ours did in fp64. Same codes almost everywhere, same objective."""
    w, h = _problem()
    quantizer = WeightQuantizer(3, 32)
    q32 = gptq_quantize(w, h, quantizer, act_order=True, dtype=torch.float32)
    q64 = gptq_quantize(w, h, quantizer, act_order=True, dtype=torch.float64)
    assert (q32.codes == q64.codes).float().mean() > 0.99
    e32, e64 = (reconstruction_error(w, q.dequantize(), h) for q in (q32, q64))
    assert abs(e32 - e64) / e64 < 0.01


def test_true_sequential_groups_follow_the_shared_inputs(tiny):
    from methods.core.arch import arch_of
    from methods.core.gptq import sequential_groups

    model, _ = tiny
    arch = arch_of(model)
    names = list(arch.block_linears(arch.layers(model)[0]))
    q, k, v, o, gate, up, down = names
    assert sequential_groups(arch, names, True) == [[q, k, v], [o], [gate, up], [down]]
    assert sequential_groups(arch, names, False) == [names]


def test_sink_weight_scales_the_first_positions_rows_of_the_hessian():
    from torch import nn

    from methods.core.calibrate import HessianCollector

    lin = nn.Linear(6, 3)
    x = torch.randn(2, 5, 6)
    plain, weighted = HessianCollector({"l": lin}, {}), HessianCollector({"l": lin}, {}, sink_weight=9.0)
    lin(x)
    plain.remove()
    weighted.remove()
    first = x[:, 0].reshape(-1, 6)
    expected = plain.hessian("l") + (2.0 / 10) * 8.0 * (first.T @ first).double()
    torch.testing.assert_close(weighted.hessian("l"), expected, rtol=1e-5, atol=1e-6)  # x xᵀ summed in fp32


@pytest.mark.parametrize("overrides", [{"true_sequential": True}, {"sink_weight": 16.0}])
def test_gptq_options_run_on_a_model_and_change_its_weights(tiny, overrides):
    from methods.core.gptq import GPTQSettings, quantize_model_gptq

    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 256, (1, 32), generator=gen) for _ in range(4)]
    results = []
    for settings in (GPTQSettings(), GPTQSettings(**overrides)):
        from harness.models import tiny_llama

        model, _ = tiny_llama(seed=0)
        totals = quantize_model_gptq(model, windows, WeightQuantizer(3, 16), settings)
        assert totals["gptq_objective"] < totals["rtn_objective"]
        results.append(model.model.layers[1].self_attn.o_proj.weight.detach().clone())
    assert not torch.equal(*results)


def test_inverse_hessian_cholesky_equals_the_cholesky_inverse_route():
    from methods.core.gptq import _inverse_hessian_cholesky

    _, h = _problem()
    damped = h + 0.01 * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    torch.testing.assert_close(_inverse_hessian_cholesky(h, 0.01), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "overrides, message",
    [({"solve_dtype": "float16"}, "solve_dtype must be one of float32, float64"), ({"sink_weight": 0.0}, "> 0")],
)
def test_bad_gptq_settings_fail_with_a_message_naming_the_valid_values(tiny, overrides, message):
    from methods.core.gptq import GPTQSettings, quantize_model_gptq

    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        quantize_model_gptq(
            model, [torch.zeros(1, 8, dtype=torch.long)], WeightQuantizer(4, 16), GPTQSettings(**overrides)
        )
