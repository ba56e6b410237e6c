"""Learnable-step weight quantizers of ParetoQ (Liu et al., arXiv 2502.02631, §3; the authors' `utils_quant.py`):
per-output-channel step α, trained with the weights, straight-through gradients.

* `lsq` — Learned Step-size Quantization (Esser et al., 2019) for 3 and 4 bits: q = clamp(round(w/α), −2^(b−1),
  2^(b−1)−1), ŵ = α·q. And 1 bit with the same gradient rule: ŵ = α·sign(w).
* `seq` — Stretched Elastic Quantization for 2 bits and ternary (1.58): the clipped range [−α, α] is cut into
  2^(b−1)·2 (2 bit) or 3 (ternary) equal bins whose centres are the levels:
  ŵ = α·(round(clamp(w/α, ±0.99)·n − s) + s)/n with (n, s) = (2, ½) at 2 bits — levels α·{±¼, ±¾} — and
  (1.5, 0) for ternary — levels α·{−⅔, 0, ⅔}.
Gradients (the authors' custom backward, not autograd through round): ∂ŵ/∂w = 1 inside the clip range, 0 outside;
∂L/∂α = Σ_row g·γ·(q − w/α inside; outside, the range end: Q_n or Q_p for LSQ, ±(n − s)/n for SEQ — ¾ at
2 bit and 1 for ternary, whose outer level is ⅔: the code's constant, kept; sign(w) at 1 bit), with the LSQ
gradient scale γ = 1/√(numel(W)·Q_p) (Q_p = 2^(b−1)−1, or 1 at 1 bit, 2 bit and ternary).
Initial α (the authors' `train.py`): mean|w| per row at 1 bit, max|w| at 2 bit and ternary, max|w|/(2^(b−1)−1) at
3 and 4 bits. Deviation: sign(0) is taken as +1 (the code's torch.sign gives 0, which a 1-bit format cannot store).

`freeze` returns the format object whose dequantize() equals the forward: symmetric integer codes (3/4 bit),
`BinaryWeight`, `TernaryWeight` (scale ⅔α), or a shared 4-entry level table × per-row α (`LUTWeight`, 2 bit).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from methods.core.formats import BinaryWeight, LUTWeight, QuantizedWeight, TernaryWeight

TERNARY = 1.58
EPS = 1e-5
CLIP = 1 - 1e-2  # SEQ's clip of w/α


def _signs(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


def _seq_bins(bits: float) -> tuple[float, float]:
    """(n, shift) of SEQ: 2 bit -> (2, 0.5), ternary -> (1.5, 0)."""
    return (1.5, 0.0) if bits == TERNARY else (2.0 ** (bits - 1), 0.5)


def _int_range(bits: float) -> tuple[int, int]:
    return (-1, 1) if bits == 1 else (-(2 ** (int(bits) - 1)), 2 ** (int(bits) - 1) - 1)


def gradient_scale(numel: int, bits: float) -> float:
    q_p = 1 if bits in (1, 2, TERNARY) else 2 ** (int(bits) - 1) - 1
    return 1.0 / math.sqrt(numel * q_p)


def _levels(w: torch.Tensor, x: torch.Tensor, bits: float) -> torch.Tensor:
    """The forward's level in units of α for weights w with x = w/α: SEQ (2, 1.58), sign (1), LSQ (3, 4)."""
    if bits in (2, TERNARY):
        return seq_levels(x, bits)
    if bits == 1:
        return _signs(w)
    lo, hi = _int_range(bits)
    return torch.clamp(torch.round(x), lo, hi)


def _range_and_slope(w: torch.Tensor, x: torch.Tensor, bits: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(where the weight gradient passes straight through, ∂ŵ/∂α before the gradient scale)."""
    if bits in (2, TERNARY):
        n, shift = _seq_bins(bits)
        lo, hi, edge = -CLIP, CLIP, (n - shift) / n
        slope = torch.where(x < lo, -edge, torch.where(x > hi, edge, seq_levels(x, bits) - x))
    else:
        lo, hi = _int_range(bits)
        if bits == 1:
            slope = _signs(w)  # every weight contributes its sign, clipped or not
        else:
            slope = torch.where(x < lo, float(lo), torch.where(x > hi, float(hi), torch.round(x) - x))
    return (x >= lo) & (x <= hi), slope


class _LearnedStep(torch.autograd.Function):
    """ŵ = α·level(w/α) with the authors' straight-through backward (LSQ and SEQ alike)."""

    @staticmethod
    def forward(ctx, w, alpha, bits):
        alpha = alpha.clamp(min=EPS)
        ctx.save_for_backward(w, alpha)
        ctx.bits = bits
        return _levels(w, w / alpha, bits) * alpha

    @staticmethod
    def backward(ctx, grad):
        w, alpha = ctx.saved_tensors
        inside, slope = _range_and_slope(w, w / alpha, ctx.bits)
        grad_alpha = (grad * slope * gradient_scale(w.numel(), ctx.bits)).sum(-1, keepdim=True)
        return grad * inside, grad_alpha, None


def seq_levels(x: torch.Tensor, bits: float) -> torch.Tensor:
    """SEQ's level (in units of α) for normalised weights x = w/α."""
    n, shift = _seq_bins(bits)
    return (torch.round(torch.clamp(x, -CLIP, CLIP) * n - shift) + shift) / n


def initial_step(weight: torch.Tensor, bits: float) -> torch.Tensor:
    """Per-row α at step 0, as the authors initialise it."""
    w = weight.detach().float().abs()
    if bits == 1:
        return w.mean(-1, keepdim=True)
    if bits in (2, TERNARY):
        return w.amax(-1, keepdim=True)
    return w.amax(-1, keepdim=True) / (2 ** (int(bits) - 1) - 1)


class ParetoQWeightQuantizer(nn.Module):
    """A weight quantizer for `qat.TrainableQLinear`: learnable per-row α, LSQ (1, 3, 4 bit) or SEQ (2, 1.58)."""

    def __init__(self, weight: torch.Tensor, bits: float):
        super().__init__()
        if bits not in (1, TERNARY, 2, 3, 4):
            raise ValueError(f"ParetoQ quantizes weights at 1, 1.58, 2, 3 or 4 bits, not {bits}")
        self.bits = bits
        self.alpha = nn.Parameter(initial_step(weight, bits))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _LearnedStep.apply(weight, self.alpha, self.bits)

    @torch.no_grad()
    def freeze(self, weight: torch.Tensor):
        w = weight.detach().float()
        alpha = self.alpha.detach().float().clamp(min=EPS)
        rows, cols = w.shape
        if self.bits == 1:
            return BinaryWeight(_signs(w).to(torch.int8), alpha, cols)
        if self.bits == TERNARY:
            trits = torch.round(torch.clamp(w / alpha, -CLIP, CLIP) * 1.5)
            return TernaryWeight(trits.to(torch.int8), alpha * (2 / 3), cols)
        if self.bits == 2:
            codes = torch.round(torch.clamp(w / alpha, -CLIP, CLIP) * 2 - 0.5) + 2  # {0, 1, 2, 3}
            levels = torch.tensor([-0.75, -0.25, 0.25, 0.75])
            return LUTWeight(codes.to(torch.uint8), levels, 2, cols, scales=alpha)
        lo, hi = _int_range(self.bits)
        codes = torch.clamp(torch.round(w / alpha), lo, hi)
        zeros = torch.zeros_like(alpha)
        return QuantizedWeight(codes.to(torch.int8), alpha, zeros, int(self.bits), True, cols)
