"""Triton kernels for the packed formats (the GPU path). Same semantics as `qkernels.reference`.

On this project's CPU-only machines they run under the Triton interpreter (`TRITON_INTERPRET=1`, set before
this module is imported) for correctness tests; timing them needs a CUDA device:
`python -m harness bench kernels --device cuda`.

* `dequant_matmul`: int2/int3/int4/int8 group-quantized weights (codes unpacked from int32 words by shifts,
  group scale and zero applied in registers) × fp16/bf16/fp32 activations, fp32 accumulation.
* `int_matmul`: int8-lane activation codes × packed signed per-channel weights, int32 accumulation
  (`tl.dot` on int8), output scaled by s_x[m]·s_w[n] (QuaRot's W4A4; W8A8 with 8-bit codes).
* `lut_matmul`: 2-bit codes indexing a per-(row, group) table of 4 levels (RCP's W2 non-uniform format).
* `fwht`: in-place fast Walsh–Hadamard transform of each row (power-of-two length), normalised.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qkernels.packing import PackedLinear, PackedLUTLinear, codes_per_word

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _check_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"Triton kernels need a CUDA device (got {device}); set TRITON_INTERPRET=1 before importing "
            "qkernels.triton_kernels for CPU correctness tests, or use qkernels.reference (the CPU path)"
        )


def _check_activation(x: torch.Tensor, in_features: int) -> None:
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"activation must be [tokens, {in_features}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"activation must be fp16, bf16 or fp32, got {x.dtype}")


@triton.jit
def _dequant_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    M,
    N,
    K,
    n_words,
    n_groups,
    n_zero_words,
    BITS: tl.constexpr,
    PER_WORD: tl.constexpr,
    GROUP: tl.constexpr,
    SYM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_w = mask_n[:, None] & mask_k[None, :]
        words = tl.load(w_ptr + offs_n[:, None] * n_words + (offs_k // PER_WORD)[None, :], mask=mask_w, other=0)
        codes = (words >> ((offs_k % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)
        groups = offs_k // GROUP
        scales = tl.load(s_ptr + offs_n[:, None] * n_groups + groups[None, :], mask=mask_w, other=0.0)
        if SYM:  # symmetric grid: the zero point is the constant 2^(b-1), not stored
            w = (codes - (1 << (BITS - 1))).to(tl.float32) * scales.to(tl.float32)
        else:
            zwords = tl.load(
                z_ptr + offs_n[:, None] * n_zero_words + (groups // PER_WORD)[None, :], mask=mask_w, other=0
            )
            zeros = (zwords >> ((groups % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)
            w = (codes - zeros).to(tl.float32) * scales.to(tl.float32)
        acc += tl.dot(x.to(tl.float32), tl.trans(w))
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


def dequant_matmul(x: torch.Tensor, packed: PackedLinear, block=(16, 32, 32)) -> torch.Tensor:
    _check_activation(x, packed.in_features)
    _check_device(x, packed.words, packed.scales, packed.zero_words)
    m, k = x.shape
    n = packed.out_features
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    bm, bn, bk = block
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _dequant_gemm_kernel[grid](
        x.contiguous(),
        packed.words.contiguous(),
        packed.scales.contiguous(),
        packed.zero_words.contiguous() if not packed.sym else packed.scales,  # unused when SYM
        out,
        m,
        n,
        k,
        packed.words.shape[1],
        packed.scales.shape[1],
        packed.zero_words.shape[1],
        BITS=packed.bits,
        PER_WORD=codes_per_word(packed.bits),
        GROUP=packed.group_size,
        SYM=packed.sym,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return out.to(x.dtype)


@triton.jit
def _int_gemm_kernel(
    xq_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    wz_ptr,
    out_ptr,
    M,
    N,
    K,
    n_words,
    BITS: tl.constexpr,
    PER_WORD: tl.constexpr,
    SYM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xq = tl.load(xq_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
        if not SYM:
            xsum += tl.sum(xq.to(tl.int32), axis=1)
        words = tl.load(
            w_ptr + offs_n[:, None] * n_words + (offs_k // PER_WORD)[None, :],
            mask=mask_n[:, None] & mask_k[None, :],
            other=0,
        )
        codes = (words >> ((offs_k % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)
        signed = tl.where(mask_k[None, :], codes - (1 << (BITS - 1)), 0).to(tl.int8)
        acc += tl.dot(xq, tl.trans(signed), out_dtype=tl.int32)
    if not SYM:  # asymmetric weights: subtract z' · Σ_k x_k (see qkernels/reference.py)
        wz = tl.load(wz_ptr + offs_n, mask=mask_n, other=0)
        acc -= xsum[:, None] * wz[None, :]
    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out, mask=mask_m[:, None] & mask_n[None, :])


def int_matmul(x_codes: torch.Tensor, x_scale: torch.Tensor, packed: PackedLinear, block=(16, 32, 32)) -> torch.Tensor:
    """Integer GEMM on packed per-channel weights (symmetric or asymmetric); x_codes int8 [M, K], x_scale fp32 [M]."""
    from qkernels.reference import integer_weight

    if x_codes.dtype != torch.int8:
        raise TypeError(f"activation codes must be int8, got {x_codes.dtype}")
    if x_codes.dim() != 2 or x_codes.shape[1] != packed.in_features:
        raise ValueError(f"activation codes must be [tokens, {packed.in_features}], got {tuple(x_codes.shape)}")
    _, w_scale, w_zero = integer_weight(packed)  # validates per-channel weights
    if w_zero is None:
        w_zero = torch.zeros_like(w_scale, dtype=torch.int32)  # not read when SYM
    _check_device(x_codes, x_scale, packed.words)
    m, k = x_codes.shape
    n = packed.out_features
    out = torch.empty(m, n, dtype=torch.float32, device=x_codes.device)
    bm, bn, bk = block
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _int_gemm_kernel[grid](
        x_codes.contiguous(),
        x_scale.float().contiguous(),
        packed.words.contiguous(),
        w_scale.to(x_codes.device),
        w_zero.to(x_codes.device),
        out,
        m,
        n,
        k,
        packed.words.shape[1],
        BITS=packed.bits,
        PER_WORD=codes_per_word(packed.bits),
        SYM=packed.sym,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return out


@triton.jit
def _lut_gemm_kernel(
    x_ptr,
    w_ptr,
    lv_ptr,
    xs_ptr,
    out_ptr,
    M,
    N,
    K,
    n_words,
    n_groups,
    GROUP: tl.constexpr,
    X_SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask_w = mask_n[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        words = tl.load(w_ptr + offs_n[:, None] * n_words + (offs_k // 16)[None, :], mask=mask_w, other=0)
        codes = (words >> ((offs_k % 16) * 2)[None, :]) & 3
        groups = offs_k // GROUP
        level_idx = (offs_n[:, None] * n_groups + groups[None, :]) * 4 + codes
        w = tl.load(lv_ptr + level_idx, mask=mask_w, other=0.0).to(tl.float32)
        acc += tl.dot(x.to(tl.float32), tl.trans(w))
    if X_SCALED:  # x held int8 activation codes: one fp32 scale per token (row)
        acc = acc * tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


def _lut_launch(x, x_scale, packed: PackedLUTLinear, block) -> torch.Tensor:
    from qkernels.reference import check_lut_kernel_layout

    check_lut_kernel_layout(packed)
    _check_device(x, packed.words, packed.levels)
    m, k = x.shape
    n = packed.words.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    bm, bn, bk = block
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _lut_gemm_kernel[grid](
        x.contiguous(),
        packed.words.contiguous(),
        packed.levels.contiguous(),
        out if x_scale is None else x_scale.float().contiguous(),  # not read unless X_SCALED
        out,
        m,
        n,
        k,
        packed.words.shape[1],
        packed.levels.shape[1],
        GROUP=packed.group_size,
        X_SCALED=x_scale is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return out


def lut_matmul(x: torch.Tensor, packed: PackedLUTLinear, block=(16, 32, 32)) -> torch.Tensor:
    _check_activation(x, packed.in_features)
    return _lut_launch(x, None, packed, block).to(x.dtype)


def lut_matmul_a(x_codes: torch.Tensor, x_scale: torch.Tensor, packed: PackedLUTLinear, block=(16, 32, 32)):
    """RCP's non-uniform W2A4 GEMV: int8 per-token activation codes × 2-bit LUT weights, fp32 accumulation, the
    token's scale applied once at the end (semantics: `qkernels.reference.lut_matmul_a`)."""
    if x_codes.dim() != 2 or x_codes.shape[1] != packed.in_features or x_codes.dtype != torch.int8:
        raise ValueError(f"activation codes must be int8 [tokens, {packed.in_features}], got {x_codes.dtype}")
    return _lut_launch(x_codes, x_scale, packed, block)


@triton.jit
def _fwht_kernel(x_ptr, out_ptr, N: tl.constexpr, LOG_N: tl.constexpr, SCALE: tl.constexpr):
    """One row per program: log2(N) butterfly stages on a register tile, as gathers + selects."""
    row = tl.program_id(0)
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + row * N + offs).to(tl.float32)
    tl.store(out_ptr + row * N + offs, x)
    h = 1
    for _ in tl.static_range(LOG_N):
        tl.debug_barrier()
        partner = tl.load(out_ptr + row * N + (offs ^ h))
        mine = tl.load(out_ptr + row * N + offs)
        tl.debug_barrier()
        tl.store(out_ptr + row * N + offs, tl.where((offs & h) == 0, mine + partner, partner - mine))
        h *= 2
    tl.debug_barrier()
    tl.store(out_ptr + row * N + offs, tl.load(out_ptr + row * N + offs) * SCALE)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh–Hadamard transform of each row of x [rows, n], n a power of two (x ↦ x Hᵀ)."""
    if x.dim() != 2:
        raise ValueError(f"fwht expects [rows, n], got {tuple(x.shape)}")
    n = x.shape[1]
    if n & (n - 1) or n < 2:
        raise ValueError(f"fwht needs a power-of-two length, got {n} (use methods.core.hadamard for m·2^k)")
    _check_device(x)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _fwht_kernel[(x.shape[0],)](x.contiguous(), out, N=n, LOG_N=n.bit_length() - 1, SCALE=n**-0.5)
    return out.to(x.dtype)
