"""Learnable diagonal gains around a frozen quantized weight: W = diag(r) · Ŵ · diag(c), r and c initialised to 1.

QuIP#'s fine-tuning (Tseng et al. 2024, §5; code `lib/algo/finetune.py`) trains its sign vectors S_U, S_V as
real fp16 vectors. Since W = (H_m S_U)ᵀ Ŵ_p (H_n S_V) = S_U (H_mᵀ Ŵ_p H_n) S_V with S_U, S_V diagonal, scaling the
sign vectors is exactly scaling the rows and columns of the dequantized weight: the codes never change, and the
gains are stored as two fp16 vectors. Attached with `torch.nn.utils.parametrize`, so the module's `weight`
stays a plain attribute for the forward pass and the gains are ordinary parameters for the shared trainer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

GAIN_PATTERN = r"parametrizations\.weight\.0\.(row|col)$"  # the gains' parameter names (trainer groups)


class OuterGains(nn.Module):
    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.row = nn.Parameter(torch.ones(rows))
        self.col = nn.Parameter(torch.ones(cols))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.row.to(weight.dtype)[:, None] * self.col.to(weight.dtype)[None, :]


def attach(module: nn.Module) -> OuterGains:
    """Give `module.weight` learnable row/column gains (identity at the start)."""
    rows, cols = module.weight.shape
    gains = OuterGains(rows, cols).to(module.weight.device)
    parametrize.register_parametrization(module, "weight", gains, unsafe=True)
    return gains


def detach(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the gains, restoring the frozen weight; returns (row, col) rounded to fp16 as they are stored."""
    gains = module.parametrizations.weight[0]
    row, col = gains.row.detach().half(), gains.col.detach().half()
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return row, col
