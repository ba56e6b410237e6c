"""Learnable weight clipping (LWC; OmniQuant, Shao et al., ICLR 2024, §3.2 eq. 2; code `quantize/quantizer.py`).

Per (row, group of inputs) two learnable logits γ, β: the clipped range is [σ(β)·min(W_g), σ(γ)·max(W_g)], the
asymmetric b-bit grid on it has step h = (σ(γ)·max − σ(β)·min) / (2^b − 1) (clamped to [1e-5, 1e4] as the code does)
and zero point z = round(−σ(β)·min / h); W is fake-quantized as (clamp(⌊W/h⌉ + z, 0, 2^b − 1) − z)·h with a
straight-through round, so γ and β learn through h. Both start at 4 (σ(4) ≈ 0.982, the code's initialisation).

Choices where this differs from the code: a width that is not a multiple of the group (SmolLM2's 576 at g128) gets a
last, narrower group inside each row (the code pads with zeros, and only for symmetric grids); the zero point is
clamped to the code range [0, 2^b − 1] so it is storable in b bits (the code only clamps to ±1e4) — the two agree
whenever a group holds weights of both signs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from methods.core.formats import QuantizedWeight

CLIP_MIN = 1e-5
CLIP_INIT = 4.0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class LWCQuantizer(nn.Module):
    """A `methods.core.qat` weight quantizer: forward(W) the LWC fake-quantized weight (identity while
    `enabled` is False: the block's FP output), freeze(W) the `QuantizedWeight` it equals."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int | None, init: float = CLIP_INIT):
        super().__init__()
        rows, cols = weight.shape
        self.bits, self.cols = bits, cols
        self.group_size = group_size or cols
        groups = math.ceil(cols / self.group_size)
        self.upper = nn.Parameter(torch.full((rows, groups), float(init)))
        self.lower = nn.Parameter(torch.full((rows, groups), float(init)))
        self.enabled = True

    def _grouped(self, weight: torch.Tensor) -> torch.Tensor:
        """[rows, groups, group_size]; a last partial group is padded with copies of its last column (min and max
        unchanged; the padding is cut off after quantization)."""
        pad = (-self.cols) % self.group_size
        if pad:
            weight = torch.cat([weight, weight[:, -1:].expand(-1, pad)], dim=1)
        return weight.reshape(weight.shape[0], -1, self.group_size)

    def _step_and_zero(self, grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qmax = 2**self.bits - 1
        high = torch.sigmoid(self.upper) * grouped.amax(-1)
        low = torch.sigmoid(self.lower) * grouped.amin(-1)
        step = ((high - low) / qmax).clamp(CLIP_MIN, 1e4)
        zero = (-low / step).round().clamp(0, qmax)
        return step, zero

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        grouped = self._grouped(weight)
        step, zero = self._step_and_zero(grouped)
        step, zero = step.unsqueeze(-1), zero.unsqueeze(-1)
        codes = (round_ste(grouped / step) + zero).clamp(0, 2**self.bits - 1)
        return ((codes - zero) * step).reshape(weight.shape[0], -1)[:, : self.cols]

    @torch.no_grad()
    def freeze(self, weight: torch.Tensor) -> QuantizedWeight:
        grouped = self._grouped(weight)
        step, zero = self._step_and_zero(grouped)
        codes = (torch.round(grouped / step.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, 2**self.bits - 1)
        codes = codes.reshape(weight.shape[0], -1)[:, : self.cols].to(torch.uint8)
        return QuantizedWeight(codes, step, zero, self.bits, sym=False, group_size=self.group_size)
