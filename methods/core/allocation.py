"""Bit allocation under a total budget from per-unit sensitivities (RSAVQ's Weight Channel Sensitivity Guidance,
Xu et al., arXiv 2510.01240, as issue 44 describes it; the allocation rule is reconstructed, not the paper's text).

Each unit c (a block of input channels sharing one vector codebook) has a sensitivity s_c ≥ 0 (the trace of the
Fisher information over its weights) and takes one width b_c from `choices`. The predicted loss increase is
Σ_c s_c · 2^(−2 b_c) — the high-rate distortion of a b-bit quantizer, 2^(−2b) up to a constant, weighted by the
curvature the loss sees — and the budget is exact: Σ_c b_c = average · n. Starting from the narrowest width,
the greedy step widens the unit with the largest loss reduction per added bit; the reductions of one unit
shrink as it widens (2^(−2b) is convex), so the greedy result is the discrete optimum (a separable convex
resource allocation). Its continuous relaxation is the classical b_c = b̄ + ½ log2(s_c / geometric mean of s).
"""

from __future__ import annotations

import heapq

import torch


def predicted_loss(sensitivity: torch.Tensor, bits: torch.Tensor) -> float:
    """Σ_c s_c · 2^(−2 b_c)."""
    return float((sensitivity.double() * torch.pow(2.0, -2.0 * bits.double())).sum())


def allocate_bits(
    sensitivity: torch.Tensor, choices: tuple[int, ...] = (1, 2, 3), average: float = 2.0
) -> torch.Tensor:
    """Widths [n] from `choices`, summing to exactly `average` · n, minimising `predicted_loss` (module docstring).
    Ties go to the lower index."""
    widths = sorted(set(choices))
    n = sensitivity.numel()
    budget = average * n
    if abs(budget - round(budget)) > 1e-9:
        raise ValueError(f"average {average} bits over {n} units is not a whole number of bits; pick another average")
    budget = round(budget)
    if not widths[0] * n <= budget <= widths[-1] * n:
        raise ValueError(f"average {average} bits is outside the choices {widths}")
    level = [0] * n  # index into widths
    s = sensitivity.double().tolist()
    spare = budget - widths[0] * n

    def gain(c: int) -> float:  # loss reduction per added bit of the next step up
        here, there = widths[level[c]], widths[level[c] + 1]
        return s[c] * (2.0 ** (-2 * here) - 2.0 ** (-2 * there)) / (there - here)

    heap = [(-gain(c), c) for c in range(n) if len(widths) > 1]
    heapq.heapify(heap)
    while spare > 0:
        fitting = []
        while heap:
            candidate = heapq.heappop(heap)
            c = candidate[1]
            if widths[level[c] + 1] - widths[level[c]] <= spare:
                break
            fitting.append(candidate)  # a step too wide for what is left: keep it aside
        else:
            raise ValueError(f"the choices {widths} cannot spend exactly {budget} bits over {n} units")
        for kept in fitting:
            heapq.heappush(heap, kept)
        spare -= widths[level[c] + 1] - widths[level[c]]
        level[c] += 1
        if level[c] + 1 < len(widths):
            heapq.heappush(heap, (-gain(c), c))
    return torch.tensor([widths[i] for i in level])


def geometric_allocation(sensitivity: torch.Tensor, average: float) -> torch.Tensor:
    """The continuous optimum b_c = b̄ + ½ log2(s_c / geometric mean) (no width limits; s_c > 0)."""
    logs = torch.log2(sensitivity.double())
    return average + 0.5 * (logs - logs.mean())
