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
