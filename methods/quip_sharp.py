"""QuIP# (Tseng, Chee, Sun, Kuleshov, De Sa; ICML 2024, arXiv 2402.04396; code Cornell-RelaxML/quip-sharp):
2-bit weights from the randomized Hadamard transform, BlockLDLQ and the E8P lattice codebook; 3 and 4 bits by
residual vector quantization (E8P + E8-1bit, E8P + E8P).

Per decoder linear, block by block on the calibration windows (the loop GPTQ and QuIP share):
1. H ← H / mean(diag H) + `damp`·I (the code's `regularize_H`, sigma_reg 0.01);
2. optional diagonal rescaling (`rescale`, the code's `--rescale_WH`, off by default there and here);
3. incoherence by the randomized Hadamard transform on both sides (§3): W ← (H_m S_U) W (H_n S_V)ᵀ,
   H ← (H_n S_V) H (H_n S_V)ᵀ, seeded signs; Hadamards of order 576 = 36·16, 1536 = 12·128, 192 = 12·16, Gemma's
   640 = 20·32 are exact (`methods.core.hadamard`);
4. the scale: W / (RMS(W) / s) with the codebook's MSE-optimal scale on Gaussian data, s = 1.03 (2 and 4 bit)
   or 0.98 (3 bit) (`scale` overrides it; the authors' README suggests 0.9 for 2-bit E8P);
5. BlockLDLQ (§4.1) over 8-column blocks onto E8P (`methods.core.e8p`: 65,536 vectors of E8 + ¼, a 16-bit
   index per 8 weights; at 3/4 bits plus the residual stage), last block first; then `tune_passes` block
   coordinate-descent passes (the code's `quip_tune_iters`, default 10 there; 0 here: each pass costs about
   twice BlockLDLQ itself on this CPU);
6. undo the transforms; the stored format `E8PWeight` counts 2/3/4 bits per weight + scale + seeds.

Left out, said so: the per-layer and end-to-end fine-tuning of sign vectors and norms (§5); the code's fusion of
q/k/v and gate/up into one matrix (each linear is quantized on its own here); a GPU kernel (CPU reference
decode).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core import e8p
from methods.core.bits import BitSpec
from methods.core.formats import E8PWeight
from methods.core.gptq import quantize_layerwise, reconstruction_error
from methods.core.incoherence import block_ldlq, process, rescale_factors
from methods.core.orthogonal import RandomizedHadamard
from methods.core.quantizers import WeightQuantizer


@dataclass(frozen=True)
class QuIPSharpConfig:
    damp: float = 0.01  # H / mean(diag H) + damp·I (the code's sigma_reg)
    rescale: bool = False  # the diagonal rescaling (the code's --rescale_WH)
    scale: float | None = None  # weights / (RMS / scale) before rounding; None = the codebook's (1.03 / 0.98 / 1.03)
    tune_passes: int = 0  # block coordinate-descent passes after BlockLDLQ (the code: 10)
    calib_batch_size: int = 4
    true_sequential: bool = False
    sink_weight: float = 1.0


def supports(request: Request) -> None:
    bits = request.bits
    if bits.w not in e8p.RVQ:
        raise UnsupportedBits(f"quipsharp has E8P codebooks for 2, 3 and 4 bits: use w2, w3 or w4 (got w{bits.w:g})")
    if bits.group:
        raise UnsupportedBits("quipsharp uses one scale per tensor (RMS / 1.03 after the Hadamards): drop the g<size>")


def _seed(run_seed: int, index: int, name: str, side: str) -> int:
    return zlib.crc32(f"quipsharp:{run_seed}:{index}:{name}:{side}".encode())


def quantize_linear(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    u: RandomizedHadamard,
    v: RandomizedHadamard,
    cfg: QuIPSharpConfig,
    bits: int = 2,
) -> tuple[E8PWeight, list[float]]:
    """Steps 1–6 for one linear; returns the format and the BlockLDLQ objective history (processed basis)."""
    if weight.shape[1] % e8p.DIM:
        raise ValueError(f"quipsharp needs input widths divisible by 8 (got {weight.shape[1]}): use method=quip")
    h = hessian.double() / torch.diagonal(hessian.double()).mean()
    h = h + cfg.damp * torch.eye(h.shape[0], dtype=h.dtype)
    col_scale = (
        rescale_factors(weight, h).half().double() if cfg.rescale else torch.ones(weight.shape[1], dtype=h.dtype)
    )
    w, h = process(weight, h, u, v, col_scale)
    scale = float(w.square().mean().sqrt()) / (cfg.scale or e8p.RVQ[bits][0])
    _, indices, history = block_ldlq(w / scale, h, e8p.rvq_nearest(bits), e8p.DIM, cfg.tune_passes)
    qweight = E8PWeight(indices, scale, u, v, col_scale.half() if cfg.rescale else None, bits)
    return qweight, history


def quantize(model: nn.Module, cfg: QuIPSharpConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    summary = QuantSummary()
    if not bits.quantizes_weights:
        return summary
    if (cfg.scale is not None and cfg.scale <= 0) or cfg.tune_passes < 0:
        raise ValueError(f"quipsharp needs scale > 0 and tune_passes >= 0 (got {cfg.scale}, {cfg.tune_passes})")
    b = int(bits.w)
    rtn = WeightQuantizer(b, None, sym=False)

    def solve(index: int, name: str, weight: torch.Tensor, hessian: torch.Tensor):
        rows, cols = weight.shape
        u = RandomizedHadamard.random(rows, _seed(ctx.seed, index, name, "u"))
        v = RandomizedHadamard.random(cols, _seed(ctx.seed, index, name, "v"))
        qweight, history = quantize_linear(weight, hessian, u, v, cfg, b)
        metrics = {
            "quipsharp_objective": reconstruction_error(weight, qweight.dequantize(), hessian),
            "rtn_objective": reconstruction_error(weight, rtn.quantize(weight).dequantize(), hessian),
        }
        if cfg.tune_passes:
            metrics["tune_objective_drop"] = history[0] - history[-1]
        return qweight, metrics

    summary.metrics.update(quantize_layerwise(model, ctx.calibration(), cfg, solve, desc="quipsharp"))
    return summary
