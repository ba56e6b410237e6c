"""Cayley SGD on the Stiefel manifold of square orthogonal matrices, as SpinQuant's code runs it (Liu et al.,
arXiv 2405.16406, §3.2; their `train_utils/optimizer.py`, after Li, Fuxin & Todorovic, ICLR 2020).

For a rotation R with loss gradient G (no momentum, the authors' setting):
* the skew-symmetric direction W = ½(RᵀG − GᵀR);
* the step α = min(lr, 1 / ‖W‖₁) (‖·‖₁ the largest column abs-sum), which keeps the Cayley map contractive;
* the Cayley update of Rᵀ, Y = (I − α/2 W)⁻¹ (I + α/2 W) Rᵀ, by `iterations` fixed-point steps
  Y ← Rᵀ + α W (Rᵀ + Y) / 2 from Y₀ = Rᵀ − α Gᵀ (the code: 5); `iterations=0` solves it exactly instead;
* R ← Yᵀ.
The code also re-orthogonalises by QR at random (1 step in 101 on average); here the fixed point is iterated
to its tolerance instead (`tolerance`), so R stays orthogonal to ~1e-12 without a random retraction.
"""

from __future__ import annotations

import torch


def skew_direction(rotation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return 0.5 * (rotation.T @ grad - grad.T @ rotation)


def cayley_step(
    rotation: torch.Tensor, grad: torch.Tensor, lr: float, iterations: int = 5, tolerance: float = 1e-12
) -> torch.Tensor:
    """One Cayley SGD step (module docstring) in float64; returns the new rotation."""
    r, g = rotation.double(), grad.double()
    w = skew_direction(r, g)
    alpha = min(lr, 1.0 / (float(w.abs().sum(dim=0).max()) + 1e-8))
    if iterations == 0:
        eye = torch.eye(r.shape[0], dtype=r.dtype)
        return torch.linalg.solve(eye - alpha / 2 * w, (eye + alpha / 2 * w) @ r.T).T
    y = r.T - alpha * g.T
    for step in range(max(iterations, 200)):
        new = r.T + alpha * w @ (0.5 * (r.T + y))
        converged = float((new - y).abs().max()) <= tolerance
        y = new
        if step + 1 >= iterations and converged:
            break
    return y.T


class CayleySGD(torch.optim.Optimizer):
    """`cayley_step` on every (square) parameter of its groups, each group at its scheduled lr."""

    def __init__(self, params, lr: float = 1.5, iterations: int = 5):
        super().__init__(params, {"lr": lr, "iterations": iterations})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.dim() != 2 or param.shape[0] != param.shape[1]:
                    raise ValueError(f"Cayley SGD needs square matrices, got {tuple(param.shape)}")
                new = cayley_step(param.data, param.grad, group["lr"], group["iterations"])
                param.data.copy_(new.to(param.dtype))
        return None


def orthogonality_error(rotation: torch.Tensor) -> float:
    """max |RᵀR − I|."""
    r = rotation.detach().double()
    return float((r.T @ r - torch.eye(r.shape[0], dtype=r.dtype)).abs().max())
