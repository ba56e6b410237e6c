"""Learnable Direct Partitioning (LDP): RCP's learnable non-uniform weight quantizer, with OmniQuant-style learnable
clipping (Choi, Song, Lim, Yoo, "Rotate, Clip, and Partition", arXiv 2502.15779, EMNLP Findings 2025).

Reconstructed from the public description (the paper's method section was not readable here; issue 42 states the
design). Per output channel (row) of a b-bit linear:

* clip (OmniQuant's LWC form): hi = sigmoid(γ)·max(W_row, 0), lo = sigmoid(β)·min(W_row, 0); the row's range is
  taken to include zero, as the project's asymmetric grids do, so lo ≤ 0 ≤ hi and the bounds never cross;
* partition: 2^b levels p_0 = lo < p_1 < … < p_{2^b−1} = hi whose 2^b − 1 gaps are (hi − lo)·softmax(θ_row):
  p_k = lerp(lo, hi, c_k) with c_k the cumulative gap fractions (c_0 = 0, c_last = 1 exactly), so the levels
  are ordered and inside [lo, hi] by construction. θ = 0 gives equal gaps: the uniform 2^b-level grid on
  [lo, hi] (asymmetric INT-b RTN with a real-valued zero point, the grid a LUT stores; the project's integer
  grids round the zero point instead);
* a weight maps to its nearest level (decision thresholds at the levels' midpoints);
* gradients: straight-through for a weight inside [lo, hi], zero outside (a clipped weight's gradient goes to the
  bound it sits on, as in LWC); the chosen level is a differentiable function of γ, β, θ, so they learn through
  it (as LSQ's step size does). max/min of the row are not detached (LWC's form).

The trained row is stored as b-bit codes + its 2^b fp16 levels (`formats.LUTWeight`, one group per row).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from methods.core.formats import LUTWeight

LOGIT_CAP = 1 - 1e-4  # the largest clip ratio sigmoid(γ) starts at (a ratio of 1 is logit +inf)


def ldp_levels(lo: torch.Tensor, hi: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """[rows, 2^b] ordered levels from bounds lo, hi [rows] and gap logits θ [rows, 2^b − 1]."""
    fractions = torch.cumsum(torch.softmax(theta, dim=-1), dim=-1)[:, :-1]
    zero = torch.zeros_like(fractions[:, :1])
    fractions = torch.cat([zero, fractions.clamp(0.0, 1.0), torch.ones_like(zero)], dim=-1)
    return torch.lerp(lo[:, None].expand_as(fractions), hi[:, None].expand_as(fractions), fractions)


def nearest_level(weight: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Codes [rows, cols]: the index of each weight's nearest level (ties to the lower one)."""
    thresholds = (levels[:, :-1] + levels[:, 1:]) / 2
    return torch.searchsorted(thresholds.contiguous(), weight.contiguous())


def uniform_grid_fake_quant(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """LDP at θ = 0 with the groups' own range (zero included): the grid the clip search tries bounds on."""
    lo, hi = groups.amin(-1, keepdim=True).clamp(max=0), groups.amax(-1, keepdim=True).clamp(min=0)
    n = 2**bits - 1
    span = (hi - lo).clamp(min=1e-12)
    codes = torch.clamp(torch.round((groups - lo) / span * n), 0, n)
    return torch.lerp(lo, hi, codes / n)


def _logit(ratio: torch.Tensor) -> torch.Tensor:
    ratio = ratio.clamp(1e-4, LOGIT_CAP)
    return torch.log(ratio) - torch.log1p(-ratio)


class LDPQuantizer(nn.Module):
    """A row-wise learnable clip + non-uniform partition of one linear's weight (module docstring).

    `learn_partition=False` freezes θ at 0 (uniform INT-b QAT with a learnable clip: the ablation);
    `learn_clip=False` freezes γ, β."""

    def __init__(
        self,
        rows: int,
        bits: int,
        hi_ratio: torch.Tensor | float = LOGIT_CAP,
        lo_ratio: torch.Tensor | float = LOGIT_CAP,
        learn_partition: bool = True,
        learn_clip: bool = True,
    ):
        super().__init__()
        self.bits = bits
        ratios = [torch.as_tensor(r, dtype=torch.float32).expand(rows).clone() for r in (hi_ratio, lo_ratio)]
        self.gamma = nn.Parameter(_logit(ratios[0]), requires_grad=learn_clip)
        self.beta = nn.Parameter(_logit(ratios[1]), requires_grad=learn_clip)
        self.theta = nn.Parameter(torch.zeros(rows, 2**bits - 1), requires_grad=learn_partition)

    def bounds(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.sigmoid(self.beta) * weight.amin(dim=1).clamp(max=0)
        hi = torch.sigmoid(self.gamma) * weight.amax(dim=1).clamp(min=0)
        return lo, hi

    def levels(self, weight: torch.Tensor) -> torch.Tensor:
        return ldp_levels(*self.bounds(weight), self.theta)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        lo, hi = self.bounds(weight)
        levels = ldp_levels(lo, hi, self.theta)
        clipped = torch.minimum(torch.maximum(weight, lo[:, None]), hi[:, None])
        codes = nearest_level(clipped.detach(), levels.detach())
        chosen = levels.gather(1, codes)
        return chosen + (clipped - clipped.detach())

    @torch.no_grad()
    def freeze(self, weight: torch.Tensor) -> LUTWeight:
        weight = weight.float()
        lo, hi = self.bounds(weight)
        levels = ldp_levels(lo, hi, self.theta.float())
        clipped = torch.minimum(torch.maximum(weight, lo[:, None]), hi[:, None])
        codes = nearest_level(clipped, levels)
        stored = levels.half().float()  # the table is stored in fp16 (what storage_bits counts and pack() keeps)
        return LUTWeight(codes.to(torch.uint8), stored[:, None, :].contiguous(), self.bits, weight.shape[1])


def clip_ratios(original: torch.Tensor, clipped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the fraction of max(W, 0) and of min(W, 0) a clip search kept: the starting sigmoid(γ), sigmoid(β)."""
    hi0, lo0 = original.amax(dim=1).clamp(min=0), original.amin(dim=1).clamp(max=0)
    hi1, lo1 = clipped.amax(dim=1).clamp(min=0), clipped.amin(dim=1).clamp(max=0)
    hi_ratio = torch.where(hi0 > 0, hi1 / hi0.clamp(min=1e-12), torch.ones_like(hi0))
    lo_ratio = torch.where(lo0 < 0, lo1 / lo0.clamp(max=-1e-12), torch.ones_like(lo0))
    return hi_ratio, lo_ratio


def level_histogram(quantizers: dict[str, LDPQuantizer], weights: dict[str, torch.Tensor], bins: int = 20) -> str:
    """CSV of where the interior levels sit inside their row's [lo, hi] (0 = lo, 1 = hi), per linear kind: what
    LDP learned (equal gaps put a 2-bit row's interior levels at 1/3 and 2/3)."""
    counts: dict[tuple[str, int], torch.Tensor] = {}
    with torch.no_grad():
        for name, quantizer in quantizers.items():
            lo, hi = quantizer.bounds(weights[name].float())
            levels = ldp_levels(lo, hi, quantizer.theta.float())
            position = ((levels[:, 1:-1] - lo[:, None]) / (hi - lo).clamp(min=1e-12)[:, None]).clamp(0, 1)
            kind = name.rsplit(".", 1)[-1]
            for k in range(position.shape[1]):
                hist = torch.histc(position[:, k], bins=bins, min=0.0, max=1.0)
                counts[(kind, k + 1)] = counts.get((kind, k + 1), torch.zeros(bins)) + hist
    edges = [f"{i / bins:.2f}-{(i + 1) / bins:.2f}" for i in range(bins)]
    lines = ["linear,level," + ",".join(edges)]
    for (kind, level), hist in sorted(counts.items()):
        lines.append(f"{kind},{level}," + ",".join(str(int(c)) for c in hist.tolist()))
    return "\n".join(lines) + "\n"


def logit_of(ratio: float) -> float:
    """γ or β for a clip ratio (e.g. OmniQuant's initial γ = β = 4 is a ratio of sigmoid(4) ≈ 0.982)."""
    ratio = min(max(ratio, 1e-4), LOGIT_CAP)
    return math.log(ratio / (1 - ratio))
