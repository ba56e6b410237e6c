"""Packed formats and kernels: Triton (under the interpreter) == pure-torch reference == fake-quant module."""

import pytest  # noqa: E402
import torch  # noqa: E402

from methods.core.formats import LUTWeight  # noqa: E402
from methods.core.hadamard import hadamard_transform  # noqa: E402
from methods.core.qlinear import QLinear  # noqa: E402
from methods.core.quantizers import DynamicQuantizer, WeightQuantizer  # noqa: E402
from qkernels import reference  # noqa: E402
from qkernels import triton_kernels as tk  # noqa: E402
from qkernels.packing import (  # noqa: E402
    PackedLUTLinear,
    pack_int,
    pack_ternary,
    packed_nbytes,
    unpack_int,
    unpack_ternary,
)

pytestmark = pytest.mark.skipif(not tk.INTERPRET, reason="needs TRITON_INTERPRET=1 at import")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 10, 33, 100])
def test_int_packing_round_trips(bits, cols):
    codes = torch.randint(0, 2**bits, (5, cols), dtype=torch.uint8)
    words = pack_int(codes, bits)
    assert words.dtype == torch.int32 and words.shape[1] == -(-cols // (10 if bits == 3 else 32 // bits))
    assert torch.equal(unpack_int(words, bits, cols), codes)


def test_ternary_packing_round_trips_at_1_6_bits():
    trits = torch.randint(-1, 2, (3, 23), dtype=torch.int8)
    packed = pack_ternary(trits)
    assert packed.shape == (3, 5) and torch.equal(unpack_ternary(packed, 23), trits)


def test_bad_codes_are_refused():
    with pytest.raises(ValueError, match="out of range for 2 bits"):
        pack_int(torch.tensor([[4]]), 2)
    with pytest.raises(ValueError, match="2, 3, 4 or 8 bits"):
        pack_int(torch.tensor([[1]]), 5)


def _qlinear(out_f, in_f, bits, group, sym, act_bits=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=gen) * 0.1
    q = WeightQuantizer(bits, group, sym=sym).quantize(weight)
    q.scales = q.scales.half().float()  # the deployed fp16 scales, so every path sees the same grid
    act = DynamicQuantizer(act_bits) if act_bits else None
    return QLinear(q.dequantize(), None, qweight=q, act_quant=act), q


@pytest.mark.parametrize("bits, group, sym", [(4, 32, False), (2, 16, False), (3, 32, True), (4, None, True)])
@pytest.mark.parametrize("m, k, n", [(1, 64, 48), (19, 72, 40)])
def test_weight_only_kernel_equals_reference_and_module(bits, group, sym, m, k, n):
    module, q = _qlinear(n, k, bits, group, sym)
    packed = q.pack()
    x = torch.randn(m, k)
    expected = module(x)
    ref = reference.dequant_matmul(x, packed)
    tri = tk.dequant_matmul(x, packed)
    assert torch.allclose(ref, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(tri, ref, atol=1e-5, rtol=1e-5)
    assert packed.nbytes() * 8 >= q.storage_bits()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 40, None])
@pytest.mark.parametrize("sym", [True, False])
def test_packed_bytes_match_the_word_layout(bits, group, sym):
    q = WeightQuantizer(bits, group, sym=sym).quantize(torch.randn(6, 100))
    packed = q.pack()
    per_word = 10 if bits == 3 else 32 // bits
    n_groups = -(-100 // (group or 100))
    code_bytes = 6 * -(-100 // per_word) * 4
    zero_bytes = 0 if sym else 6 * -(-n_groups // per_word) * 4
    assert packed.nbytes() == code_bytes + 6 * n_groups * 2 + zero_bytes
    assert packed.nbytes() == packed_nbytes(6, 100, n_groups, bits, sym)
    assert torch.equal(packed.codes().to(torch.int16) - (2 ** (bits - 1) if sym else 0), q.codes.to(torch.int16))


@pytest.mark.parametrize(
    "w_bits, a_bits, sym", [(4, 4, True), (8, 8, True), (2, 4, True), (4, 4, False), (8, 8, False)]
)
@pytest.mark.parametrize("m, k, n", [(3, 64, 40), (20, 96, 33), (5, 60, 7)])  # decode pad; _int_mm; K % 8 != 0
def test_integer_gemm_equals_reference_and_module(w_bits, a_bits, sym, m, k, n):
    module, q = _qlinear(n, k, w_bits, None, sym=sym, act_bits=a_bits)
    packed = q.pack()
    x = torch.randn(m, k)
    expected = module(x)
    x_codes, x_scale = reference.quantize_per_token_sym(x, a_bits)
    ref = reference.w4a4_matmul(x, packed, act_bits=a_bits)
    tri = tk.int_matmul(x_codes, x_scale, packed)
    assert torch.allclose(ref, expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(tri, ref, atol=1e-6, rtol=1e-6)
    # The integer accumulation itself is exact.
    w_codes, w_scale, w_zero = reference.integer_weight(packed)
    exact = x_codes.to(torch.int64) @ w_codes.to(torch.int64).T
    if w_zero is not None:
        exact -= x_codes.to(torch.int64).sum(1, keepdim=True) * w_zero.to(torch.int64)[None, :]
    assert torch.equal(torch.round(tri / (x_scale[:, None] * w_scale[None, :])).to(torch.int64), exact)


def test_lut_kernel_equals_reference():
    gen = torch.Generator().manual_seed(1)
    n, k, group = 24, 80, 32
    codes = torch.randint(0, 4, (n, k), generator=gen, dtype=torch.uint8)
    levels = torch.sort(torch.randn(n, -(-k // group), 4, generator=gen), dim=-1).values
    packed = PackedLUTLinear.pack(codes, levels, group)
    x = torch.randn(5, k, generator=gen)
    table = packed.levels.float()
    weight = torch.stack([table[r, torch.arange(k) // group, codes[r].long()] for r in range(n)])
    assert torch.allclose(reference.lut_matmul(x, packed), x @ weight.T, atol=1e-5)
    assert torch.allclose(tk.lut_matmul(x, packed), x @ weight.T, atol=1e-5)
    assert packed.nbytes() == n * 5 * 4 + n * 3 * 4 * 2  # 80 codes = 5 words; 3 groups x 4 fp16 levels


@pytest.mark.parametrize("group", [None, 32])
def test_w2a4_lut_kernel_equals_the_fake_quant_linear(group):
    """RCP's W2A4 GEMV: int8 per-token activation codes × the packed 2-bit LUT weight (Triton under the interpreter,
    and the CPU reference) equals the fake-quant linear (LUT weight, 4-bit per-token activations at clip 0.9)."""
    gen = torch.Generator().manual_seed(2)
    n, k = 24, 96
    group = group or k
    levels = torch.sort(torch.randn(n, k // group, 4, generator=gen), dim=-1).values * 0.05
    levels = levels.half().float()  # the packed table is fp16
    qweight = LUTWeight(torch.randint(0, 4, (n, k), generator=gen, dtype=torch.uint8), levels, 2, group)
    act = DynamicQuantizer(4, sym=True, clip_ratio=0.9)
    module = QLinear(qweight.dequantize(), None, qweight=qweight, act_quant=act)
    x = torch.randn(7, k, generator=gen)
    expected = module(x)
    x_codes, x_scale = reference.quantize_per_token_sym(x, 4, 0.9)
    packed = qweight.pack()
    ref = reference.lut_matmul_a(x_codes, x_scale, packed)
    tri = tk.lut_matmul_a(x_codes, x_scale, packed)
    assert torch.allclose(ref, expected, atol=1e-6, rtol=1e-5)
    assert torch.allclose(tri, ref, atol=1e-6, rtol=1e-6)
    assert qweight.kernel_format(4).name == ("lut2a4" if group == k else f"lut2g{group}a4")
    with pytest.raises(ValueError, match="int8"):
        reference.lut_matmul_a(x, x_scale, packed)


@pytest.mark.parametrize("n", [16, 64, 128])
def test_fwht_kernel_equals_hadamard_transform(n):
    x = torch.randn(7, n)
    assert torch.allclose(tk.fwht(x), hadamard_transform(x), atol=1e-5)


def test_bad_inputs_raise_clear_errors(monkeypatch):
    module, q = _qlinear(16, 32, 4, 16, sym=False)
    packed = q.pack()
    with pytest.raises(ValueError, match=r"activation must be \[tokens, 32\]"):
        tk.dequant_matmul(torch.randn(2, 31), packed)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        tk.dequant_matmul(torch.randint(0, 3, (2, 32)), packed)
    with pytest.raises(ValueError, match="per-channel"):
        tk.int_matmul(torch.zeros(2, 32, dtype=torch.int8), torch.ones(2), packed)
    with pytest.raises(ValueError, match="power-of-two"):
        tk.fwht(torch.randn(2, 12))
    monkeypatch.setattr(tk, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        tk.dequant_matmul(torch.randn(2, 32), packed)


def test_cpu_bench_times_every_format():
    from qkernels import bench

    results = bench.run(["smollm2-135m"], [1], reps=1)
    fmts = {r.fmt for r in results}
    reference = {"fp32", "16-bit", "w4a4", "w8a8", "w4g128-asym", "w2g128-asym", "lut2a4"}
    assert fmts == reference | {"w4g128-int4pack", "w8-int8pack"}  # + PyTorch's packed CPU kernels
    assert len(results) == 4 * 9 and all(r.median > 0 for r in results)
    assert "speedup vs 16-bit" in bench.table(results)
