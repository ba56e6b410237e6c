"""QuIP (Chee, Cai, Kuleshov, De Sa; NeurIPS 2023, arXiv 2307.13304; code Cornell-RelaxML/QuIP): weight-only
quantization with incoherence processing and LDLQ adaptive rounding.

Per decoder linear, block by block on the calibration windows (the sequential loop GPTQ uses, Hessians from one
pass of each block's inputs as the authors' `llama.py`): diagonal rescaling, seeded random orthogonal U, V
(Kronecker of two Haar factors with permutations — §4; `transform=butterfly` is the authors' code default,
blocked factors), the per-tensor grid ρ·RMS(W) without a zero level (ρ = 2.4, the code's quantizer "b"), LDLQ
through the shared GPTQ solver visiting the columns last to first, optional greedy passes, undo
(`methods.core.incoherence` has the steps and the equations).

* `QuIP` = the defaults (`order=ldlq`, `greedy_passes=0`);
* `QuIP-RG` = `order=diag greedy_passes=2` (Hessian-sorted order, then greedy local search, §5). The authors'
  `--quant ldlq` also runs `--npasses` greedy passes (default 1) after LDL; `greedy_passes=1` is that.
* damping 1% of mean diag H (`damp`, the paper's); the code's extra trace normalisation + 0.01·I is
  `trace_damp=0.01`.
Each linear's U and V come from seeds derived from the run seed, the block index and the linear's name; the
stored format (`IncoherentWeight`) counts the codes, the fp16 scale, the fp16 rescaling vector and the two
seeds. Weight-only in the paper; act/KV plug-ins compose as with any weight method.

Simplified: the paper's text beyond its abstract was not reachable here; the steps follow the issue's summary
of it and the authors' code (read in full: `method.py`, `vector_balance.py`, `quant.py`, `llama.py`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core.bits import BitSpec, check_integer_weight_bits
from methods.core.gptq import quantize_layerwise, reconstruction_error
from methods.core.incoherence import ORDERS, quip_quantize
from methods.core.orthogonal import KINDS, StructuredOrthogonal
from methods.core.params import flag, valid
from methods.core.quantizers import WeightQuantizer


@dataclass(frozen=True)
class QuIPConfig:
    """Incoherence processing + LDLQ (the solve in float64). `true_sequential` and `sink_weight` are the
    shared layer-wise loop's options (`methods.core.gptq`); calib_batch_size changes memory only."""

    damp: float = valid(0.01, gt=0)
    calib_batch_size: int = valid(4, ge=1)
    true_sequential: bool = flag(False)
    sink_weight: float = valid(1.0, ge=0)
    transform: str = valid(
        "kron", choices=KINDS
    )  # "kron" (the paper's Kronecker of two Haar factors) or "butterfly" (the code's)
    rescale: bool = flag(True)  # the diagonal rescaling d = (diag H / diag WᵀW)^¼
    rho: float = valid(2.4, gt=0)  # grid scale = rho · RMS of the processed weight
    order: str = valid("ldlq", choices=ORDERS)  # "ldlq" (last column first) or "diag" (QuIP-RG: decreasing diag H)
    greedy_passes: int = valid(0, ge=0)  # 0 = QuIP; 2 with order=diag = QuIP-RG
    trace_damp: float = valid(0.0, ge=0)  # the authors' code: 0.01 (H normalised to trace n, + 0.01·I)


def supports(request: Request) -> None:
    bits = request.bits
    check_integer_weight_bits(bits, "quip", UnsupportedBits)
    if bits.group:
        raise UnsupportedBits("quip uses one grid per tensor (scale 2.4·RMS after incoherence): drop the g<size>")


def _seed(run_seed: int, index: int, name: str, side: str) -> int:
    return zlib.crc32(f"quip:{run_seed}:{index}:{name}:{side}".encode())


def _check(cfg: QuIPConfig) -> None:
    if cfg.transform not in KINDS:
        raise ValueError(f"quip transform must be one of {', '.join(KINDS)}, got {cfg.transform!r}")
    if cfg.order not in ORDERS:
        raise ValueError(f"quip order must be one of {', '.join(ORDERS)}, got {cfg.order!r}")
    if cfg.greedy_passes < 0 or cfg.rho <= 0:
        raise ValueError(f"quip needs greedy_passes >= 0 and rho > 0 (got {cfg.greedy_passes}, {cfg.rho})")


def quantize(model: nn.Module, cfg: QuIPConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    summary = QuantSummary()
    if not bits.quantizes_weights:
        return summary
    _check(cfg)
    b = int(bits.w)
    rtn = WeightQuantizer(b, None, sym=False)  # the per-channel RTN objective, for comparison

    def solve(index: int, name: str, weight: torch.Tensor, hessian: torch.Tensor):
        rows, cols = weight.shape
        u = StructuredOrthogonal.random(rows, _seed(ctx.seed, index, name, "u"), cfg.transform)
        v = StructuredOrthogonal.random(cols, _seed(ctx.seed, index, name, "v"), cfg.transform)
        qweight, history = quip_quantize(
            weight, hessian, b, u, v, cfg.rho, cfg.damp, cfg.order, cfg.greedy_passes, cfg.rescale, cfg.trace_damp
        )
        metrics = {
            "quip_objective": reconstruction_error(weight, qweight.dequantize(), hessian),
            "rtn_objective": reconstruction_error(weight, rtn.quantize(weight).dequantize(), hessian),
        }
        if cfg.greedy_passes:
            metrics["greedy_objective_drop"] = history[0] - history[-1]
        return qweight, metrics

    summary.metrics.update(quantize_layerwise(model, ctx.calibration(), cfg, solve, desc="quip"))
    return summary
