"""QuIP: structured random orthogonal transforms, incoherence processing, LDLQ through the GPTQ solver (checked
against an independent implementation of the authors' LDL recursion), greedy passes, the stored format."""

import math

import pytest
import torch

from methods.core import e8p
from methods.core.formats import E8PWeight, IncoherentWeight
from methods.core.gptq import gptq_quantize, reconstruction_error
from methods.core.incoherence import (
    UnitGrid,
    block_ldl,
    block_ldlq,
    column_order,
    damped,
    greedy_passes,
    process,
    quip_quantize,
    rescale_factors,
)
from methods.core.orthogonal import RandomizedHadamard, StructuredOrthogonal, split_factors
from methods.core.quantizers import WeightQuantizer


def _layer(rows=48, cols=36, seed=0):
    """A weight with planted outliers and a correlated Hessian with one dominant input."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    w[3, 5] = 20.0
    w[:, 7] *= 8
    x = torch.randn(2000, cols, generator=gen, dtype=torch.float64) @ torch.randn(
        cols, cols, generator=gen, dtype=torch.float64
    )
    x[:, 2] *= 10
    return w, 2 * x.T @ x / x.shape[0]


def _mu(m: torch.Tensor) -> float:
    """μ-incoherence of a matrix: max |entry| · √(rows·cols) / ‖·‖_F."""
    return float(m.abs().max() * math.sqrt(m.numel()) / m.norm())


@pytest.mark.parametrize("kind", ["kron", "butterfly"])
@pytest.mark.parametrize("n", [576, 1536, 640, 192, 7])
def test_transforms_are_orthogonal_and_invert(kind, n):
    u = StructuredOrthogonal.random(n, seed=5, kind=kind)
    dense = u.dense()
    assert torch.allclose(dense @ dense.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(u.apply(x), x @ dense.T, atol=1e-12)
    assert torch.allclose(u.apply_transpose(u.apply(x)), x, atol=1e-12)
    assert torch.equal(StructuredOrthogonal.random(n, seed=5, kind=kind).dense(), dense)  # seed -> same U
    assert not torch.equal(StructuredOrthogonal.random(n, seed=6, kind=kind).dense(), dense)


def test_factors_follow_the_authors_split_and_kron_is_a_kronecker_product():
    assert [split_factors(n) for n in (576, 1536, 640, 192)] == [(24, 24), (32, 48), (16, 40), (24, 8)]
    u = StructuredOrthogonal.random(192, seed=1, kind="kron")
    kron = torch.kron(u.left[0], u.right[0])
    p_in = torch.eye(192, dtype=torch.float64)[u.perm_in]
    p_out = torch.eye(192, dtype=torch.float64)[u.perm_out]
    assert torch.allclose(u.dense(), p_out @ kron @ p_in, atol=1e-12)


def test_incoherence_processing_spreads_outliers_and_preserves_the_objective():
    w, h = _layer()
    u, v = StructuredOrthogonal.random(48, 1), StructuredOrthogonal.random(36, 2)
    d = rescale_factors(w, h)
    wp, hp = process(w, h, u, v, d)
    assert _mu(wp) < 0.5 * _mu(w)  # the planted outliers are spread (paper's μ bound: O(√log n))
    assert _mu(hp) < 0.6 * _mu(h)
    delta = torch.randn_like(w)  # tr(ΔW H ΔWᵀ) is the same in the processed basis
    delta_p = u.apply(v.apply(delta * d[None, :]).T).T
    assert math.isclose(
        float(torch.einsum("ij,jk,ik->", delta, h, delta)),
        float(torch.einsum("ij,jk,ik->", delta_p, hp, delta_p)),
        rel_tol=1e-9,
    )


def test_format_undoes_the_processing():
    """Codes of the processed weight at 8 bits dequantize to the original weight, to grid resolution."""
    w, h = _layer()
    u, v = StructuredOrthogonal.random(48, 1, "butterfly"), StructuredOrthogonal.random(36, 2, "butterfly")
    d = rescale_factors(w, h).half().double()
    wp, _ = process(w, h, u, v, d)
    scale = float(wp.abs().max())
    codes = torch.round((wp / scale + 1) / 2 * 255).to(torch.uint8)
    q = IncoherentWeight(codes=codes, scale=scale, bits=8, col_scale=d.half(), u=u, v=v)
    step = 2 * scale / 255
    recovered_processed = u.apply(v.apply(q.dequantize().double() * d[None, :]).T).T
    assert (recovered_processed - wp).abs().max() <= step / 2 + 1e-5
    expected = u.dense().T @ q.processed() @ v.dense() / d[None, :]
    assert torch.allclose(q.dequantize().double(), expected, atol=1e-5)
    assert q.storage_bits() == 48 * 36 * 8 + 16 + 36 * 16 + 2 * 64


def _reference_ldlq(target: torch.Tensor, h: torch.Tensor, bits: int) -> torch.Tensor:
    """The authors' LDL recursion (`round_ldl`, no greedy passes), written independently: H = L Lᵀ, L scaled to
    unit diagonal minus I; columns last to first, ŵ_i = clamp(⌊w_i + (w − ŵ)_{>i} L_{>i,i} + ½⌋)."""
    chol = torch.linalg.cholesky(h)
    unit = chol / torch.diagonal(chol)[None, :] - torch.eye(h.shape[0], dtype=h.dtype)
    out = target.clone()
    for i in reversed(range(h.shape[0])):
        feedback = (target[:, i:] - out[:, i:]) @ unit[i:, i]
        out[:, i] = torch.floor(target[:, i] + feedback + 0.5).clamp(0, 2**bits - 1)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ldlq_through_the_gptq_solver_equals_the_ldl_recursion(bits):
    w, h = _layer(rows=40, cols=30, seed=bits)
    target = ((w / (2.4 * w.square().mean().sqrt()) + 1) / 2 * (2**bits - 1)).clamp(0, 2**bits - 1)
    hd = damped(h, 0.01)
    ours = gptq_quantize(target, h, UnitGrid(bits), damp=0.01, dtype=torch.float64, order=column_order(h, "ldlq"))
    assert torch.equal(ours.codes.double(), _reference_ldlq(target, hd, bits))


def test_greedy_passes_never_increase_the_objective_and_stop_at_a_fixed_point():
    w, h = _layer(seed=3)
    target = ((w / (2.4 * w.square().mean().sqrt()) + 1) / 2 * 3).clamp(0, 3)
    start = torch.round(target)  # nearest rounding: greedy has work to do
    codes, history = greedy_passes(start, target, h, 2, passes=20, order=torch.arange(36))
    assert all(b <= a + 1e-9 for a, b in zip(history, history[1:], strict=False))
    assert history[-1] < 0.9 * history[0] and len(history) < 21  # improved, then converged
    again, more = greedy_passes(codes, target, h, 2, passes=1, order=torch.arange(36))
    assert torch.equal(again, codes) and math.isclose(more[0], more[-1])
    assert codes.min() >= 0 and codes.max() <= 3 and torch.equal(codes, codes.round())


def test_quip_beats_rtn_and_gptq_at_two_bits_on_an_incoherent_unfriendly_layer():
    """The paper's claim in miniature: with planted outliers, W2 QuIP's proxy loss is far below RTN's and
    GPTQ's per-channel grids; QuIP-RG's greedy passes lower QuIP's further."""
    w, h = _layer(seed=4)
    u, v = StructuredOrthogonal.random(48, 1), StructuredOrthogonal.random(36, 2)
    quip, _ = quip_quantize(w, h, 2, u, v)
    quip_rg, history = quip_quantize(w, h, 2, u, v, order="diag", passes=2)
    grid = WeightQuantizer(2, None)
    gptq = gptq_quantize(w, h, grid, act_order=True, dtype=torch.float64).dequantize()
    loss = {
        "quip": reconstruction_error(w, quip.dequantize(), h),
        "quip_rg": reconstruction_error(w, quip_rg.dequantize(), h),
        "rtn": reconstruction_error(w, grid.quantize(w).dequantize(), h),
        "gptq": reconstruction_error(w, gptq, h),
    }
    assert loss["quip"] < 0.5 * loss["gptq"] < 0.5 * loss["rtn"]
    assert loss["quip_rg"] < loss["quip"] and history[-1] < history[0]
    assert quip.codes.max() <= 3 and quip.dequantize().dtype == torch.float32


def _in_e8(v: torch.Tensor) -> torch.Tensor:
    """Rows of v in E8 = D8 ∪ (D8 + ½): all integers or all half-integers, with an even coordinate sum."""
    integers = (v == v.round()).all(dim=1)
    halves = ((v - 0.5) == (v - 0.5).round()).all(dim=1)
    return (integers | halves) & (v.sum(dim=1).round() % 2 == 0)


def test_e8p_has_65536_distinct_vectors_of_e8_plus_a_quarter():
    book = e8p.codebook()
    assert book.shape == (65536, 8) and torch.unique(book, dim=0).shape[0] == 65536
    assert (_in_e8(book - 0.25) | _in_e8(book + 0.25)).all()
    norms = e8p.abs_patterns().square().sum(dim=1)
    assert int((norms <= 10).sum()) == 227 and int((norms == 12).sum()) == 29


def test_e8p_fast_search_equals_brute_force():
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    fast, fast_idx = e8p.nearest(x, chunk=512)
    brute, brute_idx = e8p.nearest_bruteforce(x)
    assert torch.equal(fast, brute) and torch.equal(fast_idx, brute_idx)
    assert torch.equal(e8p.decode(fast_idx), fast)


def test_e8p_mse_on_gaussian_data_at_its_scale():
    """The paper's figure: per-coordinate MSE ≈ 0.0912 on N(0, 1) at scale 1.03 (2-bit Lloyd-Max: 0.1175)."""
    x = torch.randn(200_000, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q, _ = e8p.nearest(x * e8p.OPT_SCALE)
    assert abs(float((q / e8p.OPT_SCALE - x).square().mean()) - 0.0912) < 1e-3


@pytest.mark.parametrize("bits", [3, 4])
def test_residual_codebooks_decode_their_indices_and_beat_the_2_bit_one(bits):
    """E8P + E8-1bit (3 bit) and E8P + E8P (4 bit): decode(index) is the vector chosen; MSE on N(0, 1) at the
    codebook's scale drops well below E8P's 0.0912 (2-bit → 3-bit → 4-bit), 256 distinct E8-1bit points."""
    assert torch.unique(e8p.e81b_codebook(), dim=0).shape[0] == 256 and _in_e8(e8p.e81b_codebook()).all()
    x = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    scale = e8p.RVQ[bits][0]
    values, indices = e8p.rvq_nearest(bits)(x * scale)
    assert torch.equal(e8p.rvq_decode(indices, bits), values)
    mse = float((values / scale - x).square().mean())
    assert mse < {3: 0.035, 4: 0.011}[bits]  # scalar Lloyd-Max: 0.0345 (3 bit), 0.0095 (4 bit)
    assert int(indices.max()) < 2 ** (16 + e8p.RVQ[bits][2])
    stored = E8PWeight(
        indices[:64].reshape(8, 8), 1.0, RandomizedHadamard.random(8, 0), RandomizedHadamard.random(64, 1), bits=bits
    )
    assert stored.storage_bits() == 8 * 64 * bits + 16 + 2 * 64 and stored.dequantize().shape == (8, 64)


@pytest.mark.parametrize("n", [576, 1536, 192, 640])
def test_randomized_hadamard_is_orthogonal_and_spreads_outliers(n):
    u = RandomizedHadamard.random(n, seed=2)
    dense = u.dense()
    assert torch.allclose(dense @ dense.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.zeros(1, n, dtype=torch.float64)
    x[0, 3] = 1.0
    assert torch.allclose(u.apply(x).abs(), torch.full((1, n), n**-0.5, dtype=torch.float64))  # exact Hadamard
    assert torch.allclose(u.apply_transpose(u.apply(x)), x, atol=1e-12)


def test_block_ldl_factors_the_hessian():
    _, h = _layer(cols=32)
    unit = block_ldl(h, 8)
    blocks = unit.reshape(4, 8, 4, 8)
    for k in range(4):
        assert torch.allclose(blocks[k, :, k, :], torch.eye(8, dtype=torch.float64), atol=1e-12)
        assert blocks[:k, :, k, :].abs().max() == 0 if k else True  # lower block triangular
    d = torch.linalg.solve(unit, torch.linalg.solve(unit, h).T).T  # L⁻¹ H L⁻ᵀ is block diagonal
    off = d.clone().reshape(4, 8, 4, 8)
    for k in range(4):
        off[k, :, k, :] = 0
    assert off.abs().max() < 1e-8 * d.abs().max()


def test_block_ldlq_with_scalar_blocks_is_ldlq():
    w, h = _layer(rows=20, cols=24, seed=6)
    target = ((w / (2.4 * w.square().mean().sqrt()) + 1) / 2 * 3).clamp(0, 3)
    hd = damped(h, 0.01)

    def scalar(x):
        q = torch.floor(x + 0.5).clamp(0, 3)
        return q, q[:, 0].long()

    ours, _, _ = block_ldlq(target, hd, scalar, block=1)
    assert torch.equal(ours, _reference_ldlq(target, hd, 2))


def test_quip_sharp_rounds_better_than_nearest_and_the_format_undoes_the_transforms():
    w, h = _layer(rows=32, cols=48, seed=7)
    u, v = RandomizedHadamard.random(32, 1), RandomizedHadamard.random(48, 2)
    wp, hp = process(w, damped(h, 0.01), u, v, torch.ones(48, dtype=torch.float64))
    scale = float(wp.square().mean().sqrt()) / e8p.OPT_SCALE
    hat, idx, history = block_ldlq(wp / scale, hp, e8p.nearest, 8, tune_passes=2)
    nearest, _ = e8p.nearest((wp / scale).reshape(-1, 8))
    delta = wp / scale - nearest.reshape(32, 48)
    assert history[0] < 0.8 * float(torch.einsum("ij,jk,ik->", delta, hp, delta))
    q = E8PWeight(idx, scale, u, v)
    expected = u.dense().T @ (scale * hat) @ v.dense()
    assert torch.allclose(q.dequantize().double(), expected, atol=1e-5)
    assert q.storage_bits() == 32 * 48 * 2 + 16 + 2 * 64


def test_bad_options_are_one_line_errors_naming_the_choices():
    from methods.base import Request, UnsupportedBits
    from methods.core.arch import arch_for_model_type
    from methods.core.bits import BitSpec
    from methods.quip import QuIPConfig, _check
    from methods.quip_sharp import supports as quipsharp_supports

    with pytest.raises(ValueError, match="order must be one of ldlq, diag"):
        _check(QuIPConfig(order="sorted"))
    with pytest.raises(ValueError, match="transform must be one of kron, butterfly"):
        _check(QuIPConfig(transform="haar"))
    with pytest.raises(UnsupportedBits, match="use w2, w3 or w4"):
        quipsharp_supports(Request(BitSpec.parse("w8a16kv16"), arch_for_model_type("llama")))


def test_gains_scale_rows_and_columns_and_the_format_stores_them_as_fp16_sign_vectors():
    from dataclasses import replace

    from torch import nn

    from methods.core import gains

    w, h = _layer(rows=16, cols=24, seed=3)
    u, v = RandomizedHadamard.random(16, 1), RandomizedHadamard.random(24, 2)
    wp, _ = process(w, damped(h, 0.01), u, v, torch.ones(24, dtype=torch.float64))
    scale = float(wp.square().mean().sqrt()) / e8p.OPT_SCALE
    _, idx, _ = block_ldlq(wp / scale, damped(h, 0.01), e8p.nearest, 8)
    plain = E8PWeight(idx, scale, u, v)
    row, col = torch.rand(16).half() + 0.5, torch.rand(24).half() + 0.5
    tuned = replace(plain, row_gain=row, col_gain=col)
    expected = plain.dequantize().double() * row.double()[:, None] * col.double()[None, :]
    assert torch.allclose(tuned.dequantize().double(), expected, atol=1e-6)
    assert tuned.storage_bits() == 16 * 24 * 2 + 16 + (16 + 24) * 16  # the fp16 S_U, S_V replace the seeds

    linear = nn.Linear(24, 16, bias=False)
    base = linear.weight.detach().clone()
    module_gains = gains.attach(linear)
    assert torch.equal(linear.weight, base)  # identity at the start
    with torch.no_grad():
        module_gains.row.fill_(2.0)
    assert torch.allclose(linear.weight, 2 * base)
    got_row, got_col = gains.detach(linear)
    assert torch.equal(linear.weight.detach(), base) and got_row.dtype == torch.float16
    assert torch.equal(got_row, torch.full((16,), 2.0, dtype=torch.float16)) and torch.equal(
        got_col, torch.ones(24).half()
    )


def test_quip_sharp_end_to_end_finetuning_lowers_the_kl_to_fp_and_keeps_every_code():
    from dataclasses import replace

    from harness.models import tiny_llama
    from methods import quip_sharp
    from methods.base import QuantContext
    from methods.core.arch import decoder_linears
    from methods.core.bits import BitSpec
    from methods.core.trainer import LoopConfig

    model, tok = tiny_llama(seed=0, num_layers=1)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30)  # peaked next-token distributions: quantization error shows in KL
    norm_before = model.model.norm.weight.detach().clone()
    window = torch.randint(0, len(tok), (1, 64), generator=torch.Generator().manual_seed(0))
    cfg = quip_sharp.QuIPSharpConfig(
        e2e_epochs=3,
        e2e_valid=1,
        e2e_susv_lr=1e-2,
        e2e=LoopConfig(batch_size=1, lr=1e-3, schedule="constant", checkpoint_every=0),
    )
    summary = quip_sharp.quantize(model, cfg, BitSpec.parse("w2a16kv16"), QuantContext(0, lambda: [window] * 4))
    m = summary.metrics
    assert m["e2e_valid_loss_best"] < 0.5 * m["e2e_valid_loss_first"]
    assert m["train_steps"] == 9 and not torch.equal(model.model.norm.weight, norm_before)
    for _, _, _, module in decoder_linears(model):
        q = module.qweight
        assert q.row_gain is not None and not torch.equal(q.row_gain, torch.ones_like(q.row_gain))
        untuned = replace(q, row_gain=None, col_gain=None).dequantize()
        assert torch.allclose(module.weight, untuned * q.row_gain.float()[:, None] * q.col_gain.float()[None, :])
        assert torch.equal(module.weight, q.dequantize())  # evaluated = stored
        assert not module.weight.requires_grad and not hasattr(module, "parametrizations")


def test_quip_sharp_finetuning_needs_a_window_to_train_on():
    from harness.models import tiny_llama
    from methods import quip_sharp
    from methods.base import QuantContext
    from methods.core.bits import BitSpec

    model, tok = tiny_llama(seed=0, num_layers=1)
    windows = [torch.randint(0, len(tok), (1, 16)) for _ in range(2)]
    with pytest.raises(ValueError, match="raise calib.nsamples or lower method.e2e_valid"):
        quip_sharp.quantize(
            model, quip_sharp.QuIPSharpConfig(e2e_epochs=1, e2e_valid=2), BitSpec.parse("w2a16kv16"),
            QuantContext(0, lambda: windows),
        )  # fmt: skip


def test_quip_sharp_per_block_finetuning_tunes_toward_the_fp_block_and_stores_what_it_tuned():
    from harness.models import tiny_llama
    from methods import quip_sharp
    from methods.base import QuantContext
    from methods.core.arch import decoder_linears
    from methods.core.bits import BitSpec

    model, tok = tiny_llama(seed=0, num_layers=1)
    window = torch.randint(0, len(tok), (1, 64), generator=torch.Generator().manual_seed(0))
    cfg = quip_sharp.QuIPSharpConfig(layer_epochs=4, layer_lr=1e-3, layer_susv_lr=1e-2, calib_batch_size=1)
    m = quip_sharp.quantize(model, cfg, BitSpec.parse("w2a16kv16"), QuantContext(0, lambda: [window] * 4)).metrics
    # held-out batch = training batches here, so the tuning must reach it (summed over the three phases)
    assert m["layer_ft_mse_best"] < 0.5 * m["layer_ft_mse_first"]
    assert m["layer_ft_tokens"] == 3 * 4 * 3 * 64  # phases x epochs x training batches x tokens
    for name, _, _, module in decoder_linears(model):
        tuned = module.qweight.row_gain is not None
        assert tuned == (not name.endswith("down_proj"))  # the last group is quantized after the last tuning
        assert torch.equal(module.weight, module.qweight.dequantize())


def test_per_block_finetuning_needs_two_captured_batches():
    from torch import nn

    from methods.core.calibrate import BlockInputs
    from methods.core.finetune import tune_block_outputs
    from methods.core.trainer import ParamGroup

    block = nn.Linear(4, 4)
    inputs = BlockInputs(hidden=[torch.zeros(1, 3, 4)], kwargs=[{}])
    with pytest.raises(ValueError, match="raise calib.nsamples or lower method.calib_batch_size"):
        tune_block_outputs(block, inputs, [torch.zeros(1, 3, 4)], (ParamGroup(".*", 1e-3),), epochs=1)
