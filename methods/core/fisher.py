"""The diagonal (empirical) Fisher information of weights: F = mean over calibration windows of (∂L/∂W)², L the
window's mean next-token NLL — the curvature RSAVQ (Xu et al., arXiv 2510.01240) uses for its metric (EDSG) and
its per-channel sensitivities (WCSG), and KVQuant's sensitivity in weight space.

One backward pass per window with the model's parameters frozen except the requested weights; the model's own
gradients and `requires_grad` flags are restored afterwards. Per-window gradients, not per-token ones: the scale
differs from the per-token Fisher by a constant factor only where tokens are independent, which the methods do
not rely on (they use F relative to itself).
"""

from __future__ import annotations

import torch
from torch import nn


def weight_fisher(model: nn.Module, windows: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """{name: F [out, in]} for the named linears (`model.get_submodule(name).weight`), float32 on CPU."""
    weights = {name: model.get_submodule(name).weight for name in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    fisher = {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for window in windows:
            ids = window.reshape(1, -1)
            grads = torch.autograd.grad(model(ids, labels=ids).loss, list(weights.values()))
            for name, grad in zip(weights, grads, strict=True):
                fisher[name] += grad.detach().float().cpu() ** 2
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {name: f / len(windows) for name, f in fisher.items()}
