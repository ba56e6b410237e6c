"""The GPTQ solver (Frantar et al., 2023, Algorithm 1), for any uniform `WeightQuantizer`.

Columns are quantized one at a time in blocks of `block_size`; each column's rounding error is spread over
the not-yet-quantized columns through the Cholesky factor of the damped inverse Hessian (Eq. 3 with the
Cholesky reformulation of §4 "Step 3"), with lazy batched updates between blocks (§4 "Step 2").
* damping: λ = `damp` · mean(diag H) added to the diagonal (default 0.01, the paper's);
* dead inputs (diag H = 0) get H_ii = 1 and a zero weight column;
* groups: scale/zero per group of `group_size` *column indices* (so a trailing partial group is natural).
  Without act-order, a group's grid is fitted on the partially-updated weights when the solver reaches its
  first column (the reference implementation). With act-order (columns visited by decreasing diag H) the
  grids are "static groups": fitted on the original weights before the solve, as in the reference's
  `static_groups`, so the packed format keeps contiguous groups;
* per-channel (no group): one grid per row, fitted on the original weights.
The same routine is LDLQ (QuIP §3) when the quantizer is the same: the two are equivalent (QuIP Thm. 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.core.arch import arch_of
from methods.core.calibrate import HessianCollector, shared_input_owner, walk_blocks
from methods.core.formats import QuantizedWeight
from methods.core.qlinear import set_quantized_weight
from methods.core.quantizers import WeightQuantizer, _pad_to_groups, quantize_codes


@dataclass(frozen=True)
class GPTQSettings:
    """The solver's settings (paper defaults: damp 1% of mean diag H, blocks of 128 columns, no act-order),
    plus how many calibration windows go through a block per forward (memory only; no effect on numbers)."""

    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    calib_batch_size: int = 4


def _inverse_hessian_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    h = hessian.clone()
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    chol = torch.linalg.cholesky(h)
    inverse = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(inverse, upper=True)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: WeightQuantizer,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> QuantizedWeight:
    """Quantize `weight` [out, in] to minimise ‖(W − Ŵ) X‖² given H = 2XXᵀ; returns codes and grids."""
    w = weight.detach().double().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    group = quantizer.effective_group(cols)
    n_groups = -(-cols // group)
    scales = torch.zeros(rows, n_groups, dtype=torch.float64)
    zeros = torch.zeros(rows, n_groups, dtype=torch.float64)
    static = act_order or quantizer.group_size is None
    if static:
        grouped, _ = _pad_to_groups(w, group)
        s, z = quantizer.group_params(grouped)
        scales, zeros = s.squeeze(-1), z.squeeze(-1)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_cholesky(h, damp)
    codes = torch.zeros(rows, cols, dtype=torch.float64)
    col_group = perm // group  # group of each visited column (original index // group)

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            g = int(col_group[col])
            if not static and int(perm[col]) % group == 0:
                # First column of a group (no act-order: visiting order = index order): fit its grid on the
                # current, error-compensated weights of the whole group.
                span = torch.cat([w_block[:, i:], w[:, end:]], dim=1)[:, :group]
                s, z = quantizer.group_params(span.unsqueeze(1))
                scales[:, g], zeros[:, g] = s.reshape(-1), z.reshape(-1)
            scale, zero = scales[:, g], zeros[:, g]
            q = quantize_codes(w_block[:, i], scale, zero, quantizer.bits, quantizer.sym)
            codes[:, col] = q
            deq = scale * (q - zero)
            err = (w_block[:, i] - deq) / hinv_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            err_block[:, i] = err
        w[:, end:] -= err_block @ hinv[start:end, end:]

    inverse_perm = torch.argsort(perm)
    codes = codes[:, inverse_perm]
    return QuantizedWeight(
        codes=codes.to(torch.int8 if quantizer.sym else torch.uint8),
        scales=scales.float(),
        zeros=zeros.float(),
        bits=quantizer.bits,
        sym=quantizer.sym,
        group_size=group,
    )


def reconstruction_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """The layer-wise objective tr((W − Ŵ) H (W − Ŵ)ᵀ) that GPTQ minimises (up to the constant 2/N)."""
    delta = weight.double() - dequantized.double()
    return float(torch.einsum("ij,jk,ik->", delta, hessian.double(), delta))


def quantize_model_gptq(
    model, windows: list[torch.Tensor], quantizer: WeightQuantizer, settings: GPTQSettings
) -> dict[str, float]:
    """GPTQ every decoder linear, block by block; later blocks see the outputs of the quantized earlier ones.

    Returns the summed layer-wise objective tr(ΔW H ΔWᵀ) for GPTQ and for RTN on the same grids (a check
    that the solver helps; logged as metrics).
    """
    arch = arch_of(model)
    shared = shared_input_owner(arch)
    totals = {"gptq_objective": 0.0, "rtn_objective": 0.0}
    for _, block, inputs in walk_blocks(model, windows, settings.calib_batch_size, desc="gptq"):
        linears = {name: getattr(parent, attr) for name, (parent, attr) in arch.block_linears(block).items()}
        collector = HessianCollector(linears, shared)
        with torch.no_grad():
            for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
                block(hidden, **kwargs)
        collector.remove()
        for name, (parent, attr) in arch.block_linears(block).items():
            module = getattr(parent, attr)
            hessian = collector.hessian(name)
            weight = module.weight.data
            qweight = gptq_quantize(weight, hessian, quantizer, settings.damp, settings.block_size, settings.act_order)
            totals["gptq_objective"] += reconstruction_error(weight, qweight.dequantize(), hessian)
            totals["rtn_objective"] += reconstruction_error(weight, quantizer.quantize(weight).dequantize(), hessian)
            set_quantized_weight(parent, attr, module, qweight)
    return totals
