"""QuIP's incoherence processing and adaptive rounding (Chee et al., NeurIPS 2023, arXiv 2307.13304).

For one linear with weight W [m, n] and proxy Hessian H [n, n] (tr((Ŵ − W) H (Ŵ − W)ᵀ) is the layer objective):

1. diagonal rescaling (the authors' `preproc_rescale`): d = (diag H / diag WᵀW)^¼ per input column,
   W ← W·diag(d), H ← diag(d)⁻¹ H diag(d)⁻¹ — it equalises the weight's and the Hessian's column scales and
   leaves the objective unchanged;
2. incoherence (§4): seeded random orthogonal U [m, m], V [n, n] (`methods.core.orthogonal`: Kronecker of two
   Haar factors with permutations, or the code's butterfly), W ← U W Vᵀ, H ← V H Vᵀ — again objective-preserving,
   but max |W_ij| and max |H_ij| relative to their norms drop to O(√log n / √n) (the μ-incoherence bound);
3. the grid (the authors' quantizer "b"): one scale per tensor, s = ρ·RMS(W) with ρ = 2.4, levels
   s·(2k/(2^b − 1) − 1), k = 0 … 2^b − 1 — symmetric, with no zero level; weights outside ±s clip;
4. LDLQ (§3): rounding column by column with linear feedback from the LDL factor of H. It is GPTQ's solver
   (QuIP Thm. 6) run over the columns in the opposite order: the LDL recursion of the authors' code visits the
   last column first. `order="diag"` is QuIP-RG's Hessian-sorted order (largest diag H first);
5. greedy local search (§5, QuIP-RG): passes of exact coordinate descent over the codes on the same objective;
6. undo: Ŵ = Uᵀ Q V diag(d)⁻¹ (`formats.IncoherentWeight.dequantize`).

Damping: GPTQ's λ = `damp`·mean(diag H) (the paper's α = 0.01), after the transforms. The authors' code also
normalises H to trace n and adds 0.01·I before its own damping (`preproc_proj`): `trace_damp` (0 here by
default; 0.01 is the code's).
"""

from __future__ import annotations

import torch

from methods.core.formats import IncoherentWeight
from methods.core.gptq import gptq_quantize
from methods.core.orthogonal import StructuredOrthogonal

ORDERS = ("ldlq", "diag")


class UnitGrid:
    """The integer grid {0, …, 2^b − 1} with scale 1 and zero 0 for every row: the GPTQ solver on weights
    already mapped into code units (QuIP's grid is affine, so solving there is the same as solving on it)."""

    def __init__(self, bits: int):
        self.bits, self.sym, self.group_size = bits, False, None

    def effective_group(self, in_features: int) -> int:
        return in_features

    def group_params(self, w_grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = w_grouped.shape[:-1] + (1,)
        return torch.ones(shape, dtype=w_grouped.dtype), torch.zeros(shape, dtype=w_grouped.dtype)


def rescale_factors(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """d = (diag H / diag WᵀW)^¼, both clamped at 1e-8 as the authors' code (H normalised by its max first)."""
    h = hessian.double() / hessian.double().abs().max()
    diag_h = torch.diagonal(h).clamp(min=1e-8)
    diag_w = weight.double().square().sum(dim=0).clamp(min=1e-8)
    return (diag_h / diag_w).pow(0.25).clamp(min=1e-8)


def process(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    u: StructuredOrthogonal,
    v: StructuredOrthogonal,
    col_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U W diag(d) Vᵀ, V diag(d)⁻¹ H diag(d)⁻¹ Vᵀ) in float64."""
    w = weight.double() * col_scale[None, :]
    h = hessian.double() / col_scale[None, :] / col_scale[:, None]
    w = u.apply(v.apply(w).T).T  # rows ↦ V·row, then columns ↦ U·column
    h = v.apply(v.apply(h).T).T
    return w, (h + h.T) / 2


def grid_scale(processed: torch.Tensor, rho: float) -> float:
    """s = ρ·RMS(W) (+1e-16, as the authors' code)."""
    return float(rho * processed.square().mean().sqrt() + 1e-16)


def to_code_units(processed: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """W / s ∈ [−1, 1] ↦ [0, 2^b − 1] (clamped): level k sits at integer k."""
    maxq = 2**bits - 1
    return ((processed / scale + 1) / 2 * maxq).clamp(0, maxq)


def column_order(hessian: torch.Tensor, order: str) -> torch.Tensor:
    """The solver's visiting order: `ldlq` last column first (the LDL recursion), `diag` by decreasing diag H."""
    if order not in ORDERS:
        raise ValueError(f"quip order must be one of {', '.join(ORDERS)}, got {order!r}")
    cols = hessian.shape[0]
    if order == "ldlq":
        return torch.arange(cols - 1, -1, -1)
    return torch.argsort(torch.diagonal(hessian), descending=True)


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    return hessian + damp * torch.diagonal(hessian).mean() * eye


def greedy_passes(
    codes: torch.Tensor, target: torch.Tensor, hessian: torch.Tensor, bits: int, passes: int, order: torch.Tensor
) -> tuple[torch.Tensor, list[float]]:
    """QuIP §5's greedy local search: in `order`, set each column's codes to the integer (in [0, 2^b − 1]) that
    minimises tr((Q − W) H (Q − W)ᵀ) with the other columns fixed — round(q_i − (s·H[:, i]) / H_ii) for the
    residual s = Q − W, clamped; the objective never increases. Stops early at a fixed point.
    Returns the codes and the objective before and after each pass. (The authors' code clamps only after each
    pass, so its residual can disagree with its codes; here each step is feasible.)"""
    q = codes.double().clone()
    h = hessian.double()
    residual = q - target.double()
    history = [float(torch.einsum("ij,jk,ik->", residual, h, residual))]
    maxq = 2**bits - 1
    for _ in range(passes):
        before = q.clone()
        for i in order.tolist():
            new = torch.round(q[:, i] - (residual @ h[:, i]) / h[i, i]).clamp(0, maxq)
            residual[:, i] += new - q[:, i]
            q[:, i] = new
        history.append(float(torch.einsum("ij,jk,ik->", residual, h, residual)))
        if torch.equal(before, q):
            break
    return q, history


def quip_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    u: StructuredOrthogonal,
    v: StructuredOrthogonal,
    rho: float = 2.4,
    damp: float = 0.01,
    order: str = "ldlq",
    passes: int = 0,
    rescale: bool = True,
    trace_damp: float = 0.0,
) -> tuple[IncoherentWeight, list[float]]:
    """One linear through steps 1–6 (module docstring); returns its format and the greedy objective history
    (in the processed basis, damped Hessian; a single entry when `passes` = 0)."""
    col_scale = rescale_factors(weight, hessian) if rescale else torch.ones(weight.shape[1], dtype=torch.float64)
    col_scale = col_scale.half().double()  # the stored (fp16) d is the one the solve sees
    w, h = process(weight, hessian, u, v, col_scale)
    if trace_damp:
        h = h * (h.shape[0] / torch.trace(h)) + trace_damp * torch.eye(h.shape[0], dtype=h.dtype)
    scale = grid_scale(w, rho)
    target = to_code_units(w, scale, bits)
    visit = column_order(h, order)
    solved = gptq_quantize(target, h, UnitGrid(bits), damp=damp, dtype=torch.float64, order=visit)
    codes, history = greedy_passes(solved.codes, target, damped(h, damp), bits, passes, visit)
    qweight = IncoherentWeight(
        codes=codes.to(torch.uint8), scale=scale, bits=bits, col_scale=col_scale.half(), u=u, v=v
    )
    return qweight, history


def block_ldl(hessian: torch.Tensor, block: int) -> torch.Tensor:
    """The unit block-lower-triangular L of H = L D Lᵀ with `block`×`block` diagonal blocks D (QuIP# §4.1), from
    the Cholesky factor: L = C · blockdiag(C_kk)⁻¹."""
    n = hessian.shape[0]
    if n % block:
        raise ValueError(f"block LDL needs the width ({n}) to be a multiple of the block ({block})")
    chol = torch.linalg.cholesky(hessian.double())
    unit = chol.clone()
    for k in range(0, n, block):
        diag = chol[k : k + block, k : k + block]
        unit[:, k : k + block] = torch.linalg.solve_triangular(diag, chol[:, k : k + block], upper=False, left=False)
    return unit


def block_ldlq(
    weight: torch.Tensor, hessian: torch.Tensor, quantize_vectors, block: int = 8, tune_passes: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """BlockLDLQ (QuIP# §4.1): the rows' `block`-wide column blocks are rounded by `quantize_vectors` ([N, block]
    -> (vectors, indices)), last block first, each with the feedback (W − Ŵ)_{>k} L_{>k,k} of the later blocks'
    errors through H's unit block LDL factor. Then `tune_passes` block coordinate-descent passes (the authors'
    `quip_tune_iters`): Ŵ_k ← Q(Ŵ_k + (W − Ŵ) H_{:,k} H_kk⁻¹). Returns (Ŵ, indices [rows, cols / block], the
    objective tr((W − Ŵ) H (W − Ŵ)ᵀ) after rounding and after each pass)."""
    w, h = weight.double(), hessian.double()
    rows, cols = w.shape
    unit = block_ldl(h, block)
    hat = torch.zeros_like(w)
    indices = torch.zeros(rows, cols // block, dtype=torch.long)

    def objective() -> float:
        delta = w - hat
        return float(torch.einsum("ij,jk,ik->", delta, h, delta))

    def round_block(k: int, target: torch.Tensor) -> None:
        values, idx = quantize_vectors(target)
        hat[:, k * block : (k + 1) * block] = values
        indices[:, k] = idx

    for k in reversed(range(cols // block)):
        cur, later = slice(k * block, (k + 1) * block), slice((k + 1) * block, cols)
        round_block(k, w[:, cur] + (w[:, later] - hat[:, later]) @ unit[later, cur])
    history = [objective()]
    for _ in range(tune_passes):
        for k in reversed(range(cols // block)):
            cur = slice(k * block, (k + 1) * block)
            step = torch.linalg.solve(h[cur, cur], ((w - hat) @ h[:, cur]).T).T
            round_block(k, hat[:, cur] + step)
        history.append(objective())
    return hat, indices, history
