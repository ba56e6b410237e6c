"""PyTorch's own packed CPU kernels behind the harness's weight formats (the deployed-mode CPU path).

* `Int4CPUWeight`: 4-bit weights, per group or per channel, asymmetric or symmetric, on
  `aten._weight_int4pack_mm_for_cpu` (the kernel torchao's CPU int4 layout runs). Its format: unsigned codes
  u ∈ [0, 15] packed two per byte by `aten._convert_weight_to_int4pack_for_cpu`, and per (group, row) a scale s
  and a float offset f with ŵ = (u − 8)·s + f. Our grids map exactly: asymmetric ŵ = s·(q − z) gives u = q,
  f = (8 − z)·s; symmetric ŵ = s·q (q ∈ [−8, 7]) gives u = q + 8, f = 0. The kernel takes groups of 32, 64, 128
  or 256 columns dividing in_features; a format group (or a whole row, per channel) is split into kernel groups
  that repeat its scale and offset, so SmolLM2's 576 = 4.5 groups of 128 runs as 9 kernel groups of 64.
* `Int8CPUWeight`: 8-bit symmetric per-channel weights on `aten._weight_int8pack_mm`.
* `IntGemmCPUWeight`: per-channel integer weights (≤ 8 bits) with per-token symmetric integer activations on
  the integer GEMM (`qkernels.reference.int_matmul`, `torch._int_mm`): W4A4, W4A8, W2A4, W8A8.

Both packed weight-only kernels are fast only with bf16 activations (the fp32 path is a slow fallback: 2.7 s
vs 22 ms for a 2048 × 576 × 1536 product here), so deployed mode computes in bf16; scales and offsets are
stored in bf16 accordingly. `from_quantized` returns None for a weight the kernel cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkernels.reference import int_matmul, quantize_per_token_sym

INT4_KERNEL_GROUPS = (256, 128, 64, 32)
DEPLOY_DTYPE = torch.bfloat16


def int4_kernel_group(group_size: int, in_features: int) -> int | None:
    """The largest group the int4 kernel accepts that divides both the format's group and in_features."""
    for candidate in INT4_KERNEL_GROUPS:
        if group_size % candidate == 0 and in_features % candidate == 0:
            return candidate
    return None


def _flat(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"activation must end in {in_features} features, got {tuple(x.shape)}")
    return x.reshape(-1, in_features)


@dataclass
class Int4CPUWeight:
    packed: torch.Tensor  # uint8 [out, in / 2]
    scales_and_offsets: torch.Tensor  # bf16 [in / kernel_group, out, 2]
    kernel_group: int
    in_features: int
    out_features: int
    name: str = "int4pack-cpu"

    @classmethod
    def from_quantized(cls, qweight) -> Int4CPUWeight | None:
        codes, bits, group = qweight.codes, qweight.bits, qweight.group_size
        rows, cols = codes.shape
        kernel_group = int4_kernel_group(group, cols) if bits == 4 else None
        if kernel_group is None:
            return None
        scales = qweight.scales.float()
        if qweight.sym:
            unsigned = codes.to(torch.int32) + 8
            offsets = torch.zeros_like(scales)
        else:
            unsigned = codes.to(torch.int32)
            offsets = (8 - qweight.zeros.float()) * scales
        repeat = group // kernel_group
        n_kernel_groups = cols // kernel_group
        scales = scales.repeat_interleave(repeat, dim=1)[:, :n_kernel_groups]
        offsets = offsets.repeat_interleave(repeat, dim=1)[:, :n_kernel_groups]
        table = torch.stack([scales.T, offsets.T], dim=-1).to(DEPLOY_DTYPE).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.contiguous(), 1)
        return cls(packed, table, kernel_group, cols, rows)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = _flat(x, self.in_features).to(DEPLOY_DTYPE)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.kernel_group, self.scales_and_offsets)
        return out.reshape(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_offsets))


@dataclass
class Int8CPUWeight:
    codes: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # bf16 [out]
    in_features: int
    out_features: int
    name: str = "int8pack-cpu"

    @classmethod
    def from_quantized(cls, qweight) -> Int8CPUWeight | None:
        rows, cols = qweight.codes.shape
        if qweight.bits != 8 or not qweight.sym or qweight.group_size < cols:
            return None
        return cls(qweight.codes.to(torch.int8), qweight.scales[:, 0].to(DEPLOY_DTYPE), cols, rows)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        flat = _flat(x, self.in_features).to(DEPLOY_DTYPE)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scales)
        return out.reshape(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * self.scales.element_size()


@dataclass
class IntGemmCPUWeight:
    """Per-channel integer weights in signed int8 lanes for the integer GEMM; activations are quantized per
    token, symmetric, `act_bits` bits, scale = `act_clip` · max|x| / (2^(b−1) − 1) — the `act=rtn` grid."""

    lanes: torch.Tensor  # int8 [out, in]: q − 2^(b−1) (asymmetric) or q (symmetric)
    scales: torch.Tensor  # fp32 [out]
    zero_offsets: torch.Tensor | None  # int32 [out]: z − 2^(b−1); None for a symmetric grid
    act_bits: int
    act_clip: float
    in_features: int
    out_features: int
    name: str = "int-gemm-cpu"

    @classmethod
    def from_quantized(cls, qweight, act_bits: int, act_clip: float) -> IntGemmCPUWeight | None:
        rows, cols = qweight.codes.shape
        if qweight.bits > 8 or qweight.group_size < cols or act_bits > 8:
            return None
        if qweight.sym:
            lanes, zero = qweight.codes.to(torch.int8), None
        else:
            half = 2 ** (qweight.bits - 1)
            lanes = (qweight.codes.to(torch.int16) - half).to(torch.int8)
            zero = qweight.zeros[:, 0].round().to(torch.int32) - half
        return cls(lanes, qweight.scales[:, 0].float(), zero, act_bits, act_clip, cols, rows)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale = quantize_per_token_sym(_flat(x, self.in_features).float(), self.act_bits, self.act_clip)
        out = int_matmul(codes, scale, self.lanes, self.scales, self.zero_offsets)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        extra = 0 if self.zero_offsets is None else self.zero_offsets.numel() * 4
        return self.lanes.numel() + self.scales.numel() * 4 + extra
