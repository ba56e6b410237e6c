import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from methods.core.quantizers import (
    WeightQuantizer,
    dequantize_codes,
    fake_quantize,
    fake_quantize_dynamic,
    quantize_codes,
    scale_zero,
)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 70),
    bits=st.sampled_from([2, 3, 4, 8]),
    sym=st.booleans(),
    group=st.sampled_from([None, 8, 16, 32]),
    seed=st.integers(0, 2**16),
)
def test_weight_quantizer_properties(rows, cols, bits, sym, group, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    q = WeightQuantizer(bits, group, sym=sym).quantize(w)
    assert q.codes.shape == w.shape
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi
    deq = q.dequantize()
    # Without clipping every value is inside the grid's range: error at most half a step.
    step = q.scales.repeat_interleave(q.group_size, dim=1)[:, :cols]
    assert torch.all((deq - w).abs() <= step / 2 + 1e-6)
    # Round trip: quantizing the dequantized weight again gives the same codes.
    again = WeightQuantizer(bits, group, sym=sym).quantize(deq)
    assert torch.equal(again.dequantize(), deq) or torch.allclose(again.dequantize(), deq, atol=1e-6)


def test_values_on_grid_are_exact():
    scale = torch.tensor([[0.25]])
    zero = torch.tensor([[3.0]])
    codes = torch.arange(16, dtype=torch.float32).reshape(1, 16)
    grid = dequantize_codes(codes, scale, zero)
    assert torch.equal(fake_quantize(grid, scale, zero, 4, sym=False), grid)


def test_trailing_partial_group_equals_separate_quantization():
    w = torch.randn(3, 40)
    q = WeightQuantizer(3, 16).quantize(w).dequantize()
    tail = WeightQuantizer(3, 8).quantize(w[:, 32:]).dequantize()
    assert q.shape == w.shape
    assert torch.allclose(q[:, 32:], tail)


def test_storage_bits_counts_scales_and_zeros():
    q = WeightQuantizer(4, 32, sym=False).quantize(torch.randn(8, 64))
    assert q.storage_bits() == 8 * 64 * 4 + 8 * 2 * (16 + 4)
    qs = WeightQuantizer(4, 32, sym=True).quantize(torch.randn(8, 64))
    assert qs.storage_bits() == 8 * 64 * 4 + 8 * 2 * 16


def test_mse_clip_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(16, 128) * torch.linspace(0.1, 3, 128)
    w[0, 0] = 40.0  # an outlier that min/max wastes range on
    plain = WeightQuantizer(3, 64).quantize(w).dequantize()
    mse = WeightQuantizer(3, 64, mse_clip=True, mse_norm=2.0).quantize(w).dequantize()
    assert ((mse - w) ** 2).sum() <= ((plain - w) ** 2).sum()
    assert ((mse - w) ** 2).sum() < 0.9 * ((plain - w) ** 2).sum()


def test_dynamic_per_token_matches_explicit_and_16_is_identity():
    x = torch.randn(2, 5, 24)
    y = fake_quantize_dynamic(x, 4, sym=True, clip_ratio=0.9)
    scale, zero = scale_zero(x, 4, True, 0.9)
    assert torch.equal(y, fake_quantize(x, scale, zero, 4, True))
    assert fake_quantize_dynamic(x, 16, sym=True) is x
    grouped = fake_quantize_dynamic(x, 4, sym=False, group_size=8)
    assert torch.allclose(grouped[..., 8:16], fake_quantize_dynamic(x[..., 8:16], 4, sym=False))


def test_symmetric_grid_uses_qmax_of_signed_range():
    x = torch.tensor([[-1.0, 0.5, 1.0]])
    scale, zero = scale_zero(x, 4, sym=True)
    assert torch.allclose(scale, torch.tensor([[1.0 / 7]])) and float(zero) == 0.0


def test_full_range_symmetric_grid_is_gptqs_minmax_grid_with_zero_at_the_middle():
    """GPTQ's reference symmetric grid: min/max over [-a, a] with 2^b - 1 steps and zero at 2^(b-1), i.e.
    scale a / (2^(b-1) - 1/2); every one of the 16 codes is reachable and -a lands on the lowest one."""
    a = 1.3
    x = torch.linspace(-a, a, 401).reshape(1, -1)
    scale, zero = scale_zero(x, 4, sym=True, sym_grid="full_range")
    assert torch.allclose(scale, torch.tensor([[2 * a / 15]])) and float(zero) == 0.0
    codes = quantize_codes(x, scale, zero, 4, True)
    assert codes.unique().numel() == 16 and float(codes.min()) == -8
    absmax_codes = quantize_codes(x, *scale_zero(x, 4, sym=True), 4, True)
    assert absmax_codes.unique().numel() == 15  # the absmax grid never uses -8
    with pytest.raises(ValueError, match="sym_grid must be one of absmax, full_range"):
        scale_zero(x, 4, sym=True, sym_grid="midrise")


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(), clip=st.sampled_from([1.0, 0.9]), seed=st.integers(0, 99))
def test_fast_per_token_path_equals_the_reference_formula(bits, sym, clip, seed):
    """The activation quantizer's fewer-pass path gives exactly what scale_zero + fake_quantize give."""
    x = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(seed)) * 3
    x[0, 0] = 0  # an all-zero token
    reference = fake_quantize(x, *scale_zero(x, bits, sym, clip), bits, sym)
    assert torch.equal(fake_quantize_dynamic(x, bits, sym, clip_ratio=clip), reference)


def test_compiled_act_and_kv_quantizers_are_bit_identical_to_eager(tiny):
    """torch.compile'd per-token quantizer (evaluation's default) = eager, on tensors and through a W4A4KV4 model."""
    from methods.core.quantizers import compile_quantizers
    from tests.compose import quantize

    x = torch.randn(1, 37, 96, generator=torch.Generator().manual_seed(0)) * 4
    eager = [fake_quantize_dynamic(x, 4, True, 0.9), fake_quantize_dynamic(x, 4, False, 0.95)]
    model, _ = tiny
    from methods import METHODS

    quantize(model, "rtn", METHODS["rtn"].make_config("rtn", {}), "w4a4kv4")
    ids = torch.arange(60).reshape(1, 60) % 250
    with torch.no_grad():
        eager_logits = model(ids).logits
    try:
        compile_quantizers(True)
        assert torch.equal(fake_quantize_dynamic(x, 4, True, 0.9), eager[0])
        assert torch.equal(fake_quantize_dynamic(x, 4, False, 0.95), eager[1])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, eager_logits)
    finally:
        compile_quantizers(False)


def test_a_failing_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    from methods.core import quantizers

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(quantizers._COMPILED_ROWS, "fn", broken)
    monkeypatch.setitem(quantizers._COMPILED_ROWS, "enabled", True)
    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match="running eager"):
        out = fake_quantize_dynamic(x, 4, True)
    assert torch.equal(out, fake_quantize(x, *scale_zero(x, 4, True), 4, True))
    assert quantizers._COMPILED_ROWS["enabled"] is False


@pytest.mark.parametrize(
    "sym, grid, mse",
    [(True, "absmax", False), (False, "absmax", False), (True, "full_range", False), (True, "absmax", True)],
)
def test_straight_through_weight_is_the_stored_format_forward_and_identity_backward(sym, grid, mse):
    """SpinQuant's in-loop weight quantizer: forward = what `quantize` stores, dequantized (576 wide with g128: a
    partial group); backward passes the gradient to every entry unchanged."""
    quantizer = WeightQuantizer(4, 128, sym=sym, sym_grid=grid, mse_clip=mse)
    weight = torch.randn(24, 576, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out = quantizer.straight_through(weight)
    assert torch.equal(out.detach(), quantizer.quantize(weight).dequantize())
    gradient = torch.randn(24, 576)
    out.backward(gradient)
    assert torch.equal(weight.grad, gradient)
