"""R2Q — Residual Refinement Quantization (Chen, Shi, Huo, Wu, arXiv 2511.21736): a 2-bit weight as two
sequential 1-bit steps, **reconstructed from the public description** (abstract and summaries; the method section
and code were not readable here — issue 43's design).

Per output channel, or per group of `group` inputs, with scales α1, α2 ≥ 0:

    s1 = sign(w),  s2 = sign(w − α1·s1),  ŵ = α1·s1 + α2·s2

so the four levels ±α1 ± α2 (symmetric around 0) form the "adaptive lattice". Initialisation is greedy residual
binarization — α1 = mean|w| (the optimal 1-bit scale for s1 = sign(w)), α2 = mean|w − α1·s1| (the optimal
scale for the residual's signs) — which is itself a data-free 2-bit PTQ (zero training steps). Training:
straight-through for w inside the lattice's span |w| ≤ α1 + α2 (zero outside), exact gradients for α1 and α2
(∂ŵ/∂α1 = s1, ∂ŵ/∂α2 = s2 almost everywhere: s2 is piecewise constant in α1).

Open choices (none public): sign(0) = +1 (a 1-bit code has no zero); α clamped at 1e-5 from below; the partial
last group of a width that the group size does not divide is filled by replicating its last weight (as the
project's other group quantizers); stored as the LUT format — 2-bit codes (2·[s1 > 0] + [s2 > 0]) and the 4
levels per row/group in fp16 (the LUT kernel runs it; two fp16 scales per group would be 16 bits smaller).

Measured on SmolLM2-135M's decoder linears (session of 2026-12-08): the greedy lattice's span α1 + α2 lies below
max|w| — median max|w| / (α1 + α2) = 2.69 per channel — so 19.7 % of the weights per channel (19.9 % per group
of 64) start outside it, where the straight-through gradient is zero; per group of 64 the greedy grid has a lower
weight MSE than min-max INT2 (543,924 vs 859,750 summed) but puts 27.6 % of it on each group's largest weight
(INT2: 2.6 %). ParetoQ's SEQ starts at 2 bits from α = max|W|, with every weight inside its span.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.core.clip_search import pad_groups_replicating
from methods.core.formats import LUTWeight

EPS = 1e-5


def signs(x: torch.Tensor) -> torch.Tensor:
    """±1 with sign(0) = +1."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def greedy_scales(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α1, α2) [.., n_groups, 1] of greedy residual binarization of groups along the last dim."""
    alpha1 = grouped.abs().mean(-1, keepdim=True)
    alpha2 = (grouped - alpha1 * signs(grouped)).abs().mean(-1, keepdim=True)
    return alpha1, alpha2


def residual_signs(grouped: torch.Tensor, alpha1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s1 = signs(grouped)
    return s1, signs(grouped - alpha1 * s1)


def greedy_fake_quant(grouped: torch.Tensor) -> torch.Tensor:
    """Greedy residual binarization of groups along the last dim (no gradient path): the data-free 2-bit grid,
    e.g. for a clip search."""
    alpha1, alpha2 = greedy_scales(grouped)
    s1, s2 = residual_signs(grouped, alpha1)
    return alpha1 * s1 + alpha2 * s2


class R2QWeightQuantizer(nn.Module):
    """A weight quantizer for `qat.TrainableQLinear` (module docstring): learnable α1, α2 per (row, group),
    initialised greedily from `weight`; `group` None = one group per row (per channel)."""

    bits = 2

    def __init__(self, weight: torch.Tensor, group: int | None = None):
        super().__init__()
        self.group = group or weight.shape[1]
        alpha1, alpha2 = greedy_scales(pad_groups_replicating(weight.detach().float(), self.group))
        self.alpha1, self.alpha2 = nn.Parameter(alpha1), nn.Parameter(alpha2)

    def _alphas(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alpha1.clamp(min=EPS), self.alpha2.clamp(min=EPS)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows, cols = weight.shape
        grouped = pad_groups_replicating(weight, self.group)
        alpha1, alpha2 = self._alphas()
        s1, s2 = residual_signs(grouped.detach(), alpha1.detach())
        inside = (grouped.detach().abs() <= (alpha1 + alpha2).detach()).to(grouped.dtype)
        through = (grouped - grouped.detach()) * inside  # zero in value, the straight-through path for w
        fake = alpha1.to(grouped.dtype) * s1 + alpha2.to(grouped.dtype) * s2 + through
        return fake.reshape(rows, -1)[:, :cols]

    def levels(self) -> torch.Tensor:
        """[rows, n_groups, 4]: the table indexed by code 2·[s1 > 0] + [s2 > 0]."""
        alpha1, alpha2 = (a.detach().float().squeeze(-1) for a in self._alphas())
        return torch.stack([-alpha1 - alpha2, -alpha1 + alpha2, alpha1 - alpha2, alpha1 + alpha2], dim=-1)

    @torch.no_grad()
    def freeze(self, weight: torch.Tensor) -> LUTWeight:
        rows, cols = weight.shape
        grouped = pad_groups_replicating(weight.detach().float(), self.group)
        alpha1, _ = self._alphas()
        s1, s2 = residual_signs(grouped, alpha1.detach().float())
        codes = (2 * (s1 > 0).to(torch.uint8) + (s2 > 0).to(torch.uint8)).reshape(rows, -1)[:, :cols]
        return LUTWeight(codes, self.levels().half().float(), 2, self.group)
