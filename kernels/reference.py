"""Pure-torch kernels with the exact semantics of the Triton ones; also the CPU execution path.

* `dequant_matmul`: weight-only formats, dequantize then matmul (x @ Ŵᵀ).
* `w4a4_matmul` / `w8a8_matmul`: per-token symmetric integer activations × per-channel symmetric integer
  weights, integer accumulation (`torch._int_mm` on CPU: int8 × int8 -> int32), output scaled by
  s_x[m] · s_w[n] (QuaRot's W4A4 format; int4 values travel in int8 lanes).
* `lut_matmul`: non-uniform 2-bit weights (4-level table per group) × activations.
"""

from __future__ import annotations

import torch

from kernels.packing import PackedLinear, PackedLUTLinear


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


def quantize_per_token_sym(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token codes in int8 lanes and fp32 scales (the ActQuantizer grid, clip 1)."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).float() / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round(x.float() / scale), -qmax - 1, qmax).to(torch.int8)
    return codes, scale.squeeze(-1)


def int_matmul(
    x_codes: torch.Tensor, x_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """(x_codes · w_codesᵀ) in int32, then · s_x[m] · s_w[n]. w_codes: int8 [N, K] signed."""
    if x_codes.dtype != torch.int8 or w_codes.dtype != torch.int8:
        raise TypeError(f"integer matmul needs int8 codes, got {x_codes.dtype} and {w_codes.dtype}")
    m = x_codes.shape[0]
    if m > 16 and x_codes.shape[1] % 8 == 0:
        acc = torch._int_mm(x_codes, w_codes.T.contiguous())
    else:  # _int_mm needs more than 16 rows; int32 matmul is exact too
        acc = x_codes.to(torch.int32) @ w_codes.to(torch.int32).T
    return acc.to(torch.float32) * x_scale[:, None] * w_scale[None, :].float()


def signed_codes(packed: PackedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric packed weight -> (int8 signed codes [N, K], fp32 scales [N])."""
    if packed.group_size != packed.in_features:
        raise ValueError("integer GEMM needs per-channel weight scales (group size = in_features)")
    zero = 2 ** (packed.bits - 1)
    if not torch.all(packed.zeros() == zero):
        raise ValueError("integer GEMM needs a symmetric weight grid (zero point 2^(bits-1))")
    return (packed.codes().to(torch.int16) - zero).to(torch.int8), packed.scales[:, 0].float()


def w4a4_matmul(x: torch.Tensor, packed: PackedLinear, act_bits: int = 4) -> torch.Tensor:
    _check_activation(x, packed.in_features)
    w_codes, w_scale = signed_codes(packed)
    x_codes, x_scale = quantize_per_token_sym(x, act_bits)
    return int_matmul(x_codes, x_scale, w_codes, w_scale).to(x.dtype)


def lut_matmul(x: torch.Tensor, packed: PackedLUTLinear) -> torch.Tensor:
    _check_activation(x, packed.in_features)
    codes = packed.codes().to(torch.int64)
    groups = (torch.arange(packed.in_features) // packed.group_size).expand_as(codes)
    rows = torch.arange(codes.shape[0])[:, None].expand_as(codes)
    weight = packed.levels.float()[rows, groups, codes]
    return x @ weight.to(x.dtype).T
