"""Pure-torch kernels with the exact semantics of the Triton ones; also the CPU execution path.

* `dequant_matmul`: weight-only formats, dequantize then matmul (x @ Ŵᵀ).
* `w4a4_matmul`: per-token symmetric integer activations × per-channel integer weights, integer
  accumulation (`torch._int_mm` on CPU: int8 × int8 -> int32), output scaled by s_x[m] · s_w[n] (QuaRot's
  W4A4 format; W8A8 and W2A4 are the same path, int2/int4 values travel in int8 lanes). Asymmetric weights
  are exact too: with signed lanes w' = q − 2^(b−1) and z' = z − 2^(b−1),
  Σ_k x_k (q_k − z) = Σ_k x_k w'_k − z' Σ_k x_k, one integer row sum per token.
* `lut_matmul`: non-uniform 2-bit weights (4-level table per group) × activations.
"""

from __future__ import annotations

import torch

from qkernels.packing import PackedLinear, PackedLUTLinear


def dequantize(packed: PackedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = packed.codes().to(torch.float32)
    g = packed.group_size
    scales = packed.scales.to(torch.float32).repeat_interleave(g, dim=1)[:, : packed.in_features]
    zeros = packed.zeros().to(torch.float32).repeat_interleave(g, dim=1)[:, : packed.in_features]
    return ((codes - zeros) * scales).to(dtype)


def _check_activation(x: torch.Tensor, in_features: int) -> None:
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"activation must be [tokens, {in_features}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"activation must be floating point, got {x.dtype}")


def dequant_matmul(x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    _check_activation(x, packed.in_features)
    return x @ dequantize(packed, x.dtype).T


def quantize_per_token_sym(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token codes in int8 lanes and fp32 scales (the ActQuantizer grid, clip `clip_ratio`)."""
    qmax = 2 ** (bits - 1) - 1
    scale = clip_ratio * x.abs().amax(dim=-1, keepdim=True).float() / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round(x.float() / scale), -qmax - 1, qmax).to(torch.int8)
    return codes, scale.squeeze(-1)


def int_matmul(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """(x_codes · w_codesᵀ − rowsum(x_codes) · w_zero) in int32, then · s_x[m] · s_w[n].

    w_codes: signed int8 lanes [N, K]; w_zero: int32 [N] zero offsets in the same lanes (None = symmetric).
    """
    if x_codes.dtype != torch.int8 or w_codes.dtype != torch.int8:
        raise TypeError(f"integer matmul needs int8 codes, got {x_codes.dtype} and {w_codes.dtype}")
    m = x_codes.shape[0]
    if x_codes.shape[1] % 8 == 0:  # `torch._int_mm` needs K % 8 == 0 and more than 16 rows: pad decode batches
        rows = max(m, 17)
        padded = x_codes if rows == m else torch.nn.functional.pad(x_codes, (0, 0, 0, rows - m))
        acc = torch._int_mm(padded, w_codes.T)[:m]  # the transposed view: no per-call weight copy
    else:  # int32 matmul is exact too, only slower
        acc = x_codes.to(torch.int32) @ w_codes.to(torch.int32).T
    if w_zero is not None:
        acc = acc - x_codes.to(torch.int32).sum(dim=1, keepdim=True) * w_zero.to(torch.int32)[None, :]
    return acc.to(torch.float32) * x_scale[:, None] * w_scale[None, :].float()


def integer_weight(packed: PackedLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-channel packed weight -> (int8 signed lanes [N, K], fp32 scales [N], int32 zero offsets [N] or None).

    Lanes are q − 2^(b−1) (b ≤ 8 fits int8); the zero offset is z − 2^(b−1), None for a symmetric grid.
    """
    if packed.group_size != packed.in_features:
        raise ValueError(
            f"integer GEMM needs per-channel weight scales (group size = in_features = {packed.in_features}), "
            f"got group size {packed.group_size}"
        )
    half = 2 ** (packed.bits - 1)
    lanes = (packed.codes().to(torch.int16) - half).to(torch.int8)
    zero = None if packed.sym else packed.zeros()[:, 0].to(torch.int32) - half
    return lanes, packed.scales[:, 0].float(), zero


def w4a4_matmul(x: torch.Tensor, packed: PackedLinear, act_bits: int = 4) -> torch.Tensor:
    _check_activation(x, packed.in_features)
    w_codes, w_scale, w_zero = integer_weight(packed)
    x_codes, x_scale = quantize_per_token_sym(x, act_bits)
    return int_matmul(x_codes, x_scale, w_codes, w_scale, w_zero).to(x.dtype)


def check_lut_kernel_layout(packed: PackedLUTLinear) -> None:
    if packed.bits != 2 or packed.scales is not None or packed.levels.dim() != 3:
        raise ValueError("the LUT kernel runs 2-bit codes with per-(row, group) tables of 4 levels only")


def lut_weight(packed: PackedLUTLinear) -> torch.Tensor:
    """The fp32 [out, in] weight a 2-bit per-(row, group) LUT layout holds."""
    check_lut_kernel_layout(packed)
    codes = packed.codes().to(torch.int64)
    groups = (torch.arange(packed.in_features) // packed.group_size).expand_as(codes)
    rows = torch.arange(codes.shape[0])[:, None].expand_as(codes)
    return packed.levels.float()[rows, groups, codes]


def lut_matmul(x: torch.Tensor, packed: PackedLUTLinear) -> torch.Tensor:
    _check_activation(x, packed.in_features)
    return x @ lut_weight(packed).to(x.dtype).T


def lut_matmul_a(x_codes: torch.Tensor, x_scale: torch.Tensor, packed: PackedLUTLinear) -> torch.Tensor:
    """Non-uniform W2 × per-token symmetric integer activations (RCP's W2A4 GEMV): y = s_x ⊙ (q_x · Wᵀ) with W the
    LUT weight, accumulated in fp32 (the activation codes are exact small integers)."""
    if x_codes.dim() != 2 or x_codes.shape[1] != packed.in_features or x_codes.dtype != torch.int8:
        raise ValueError(f"activation codes must be int8 [tokens, {packed.in_features}], got {x_codes.dtype} "
                         f"{tuple(x_codes.shape)}")  # fmt: skip
    return (x_codes.float() @ lut_weight(packed).T) * x_scale.float()[:, None]
