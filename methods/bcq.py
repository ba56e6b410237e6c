"""LO-BCQ: block clustered quantization for W4A4 (Elangovan et al., arXiv 2502.05376; no public code).

Weights are encoded offline and activations online (`act=bcq`) with the same *universal* codebooks: N_c
codebooks of 16 integer entries, designed once by LO-BCQ (§2.2: alternate min-MSE block-to-codebook
assignment and per-cluster Lloyd-Max) on blocks sampled from every decoder linear's weights and — when the
bits quantize activations — from those linears' inputs on the calibration windows, then frozen and shared by
all layers (the paper calibrates its codebooks once and reuses them across models; here they are designed on
the model being quantized, which is the in-distribution case). The primitives and the format's scale layout
are in `methods/core/bcq.py`; defaults L_b = 8, N_c = 16, INT6 entries, L_A = 64 (4.625 bits per scalar:
the paper's L_A = 128 does not divide SmolLM2's 576; a row scale and the codebooks add ~0.06 more).

Same-bit baselines (issue 16): `n_codebooks=1` (one LO-BCQ codebook: the clustering's contribution), and
`uniform=true` (one uniform 16-level grid on the same block-array and row scales: `uniform_grid=int4`, the
default, is two's-complement INT4 ×4 on the INT6 scale, entries −32…28 in steps of 4, zero included, as INT4
formats have; `uniform_grid=midrise` is −30…30 in steps of 4, symmetric but without a zero — the grid of the
first uniform row, kept to re-create it; measured on outlier-scaled Laplace arrays its MSE is 1.42× int4's).
With `act=bcq` the plug-in receives these codebooks; with `act=rtn` activations are per-token
INT4. KV stays 16-bit unless the bits say otherwise. Embeddings and lm_head stay 16-bit.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core import bcq
from methods.core.arch import decoder_linears
from methods.core.bits import BitSpec
from methods.core.formats import BCQWeight
from methods.core.params import Valid, added_later, flag, valid
from methods.core.qlinear import set_quantized_weight

log = logging.getLogger(__name__)

UNIFORM_GRIDS = {
    "int4": torch.arange(-32, 29, 4, dtype=torch.float32),  # INT4 (−8…7) ×4 on the INT6 scale, zero included
    "midrise": torch.arange(-30, 31, 4, dtype=torch.float32),  # 16 symmetric levels, no zero (the first uniform row's)
}
UNIFORM_ENTRIES = UNIFORM_GRIDS["int4"]


@dataclass(frozen=True)
class BCQConfig:
    block_len: int = valid(8, ge=1)  # L_b
    array_len: int = valid(64, ge=1)  # L_A
    n_codebooks: int = valid(16, ge=1)  # N_c
    entry_bits: int = valid(6, ge=2, le=8)
    iterations: int = valid(20, ge=0)  # LO-BCQ assignment/refit rounds
    lloyd_iterations: int = valid(1, ge=0)  # Lloyd-Max steps per codebook per round
    calib_blocks: int = valid(200_000, ge=1)  # blocks sampled for codebook design (half weights, half activations)
    uniform: bool = flag(False)  # baseline: one uniform INT4 grid instead of LO-BCQ codebooks
    # int4 (−32…28 step 4, zero included) | midrise (−30…30)
    uniform_grid: str = added_later("int4", "midrise", only_if="uniform", valid=Valid(choices=tuple(UNIFORM_GRIDS)))

    def layout(self) -> bcq.BCQLayout:
        return bcq.BCQLayout(self.block_len, self.array_len, 1 if self.uniform else self.n_codebooks, self.entry_bits)


def supports(request: Request) -> None:
    bits = request.bits
    if bits.w != 4:
        raise UnsupportedBits(f"bcq encodes 4-bit indices: use w4 (got w{bits.w:g})")
    if bits.group:
        raise UnsupportedBits("bcq sets its own blocks (method.block_len, method.array_len): drop the g<size>")


def design_codebooks(model, cfg: BCQConfig, bits: BitSpec, ctx: QuantContext, generator) -> tuple[torch.Tensor, dict]:
    """The universal codebooks (integer entries) and what their design measured."""
    layout = cfg.layout()
    if cfg.uniform:
        if cfg.uniform_grid not in UNIFORM_GRIDS:
            raise ValueError(f"bcq uniform_grid must be one of {', '.join(UNIFORM_GRIDS)}, got {cfg.uniform_grid!r}")
        return UNIFORM_GRIDS[cfg.uniform_grid].reshape(1, -1).clone(), {}
    linears = list(decoder_linears(model))
    share = cfg.calib_blocks // 2 if bits.quantizes_activations else cfg.calib_blocks
    per_weight = max(1, share // len(linears))
    blocks = [bcq.sample_blocks(m.weight.data, layout, per_weight, generator) for _, _, _, m in linears]
    if bits.quantizes_activations:
        blocks.append(bcq.activation_blocks(model, ctx.calibration(), layout, share, generator))
    start = time.perf_counter()
    real, history = bcq.lo_bcq(torch.cat(blocks), layout.n_codebooks, cfg.iterations, cfg.lloyd_iterations)
    entries = bcq.integer_entries(real, layout)
    pooled = torch.cat(blocks)
    final = float(bcq.encode_blocks(pooled, entries)[2].sum()) / pooled.numel()
    metrics = {
        "bcq_design_seconds": time.perf_counter() - start,
        "bcq_design_blocks": float(pooled.shape[0]),
        "bcq_mse_first": history[0],
        "bcq_mse_last": history[-1],
        "bcq_mse_integer_entries": final,
    }
    return entries, metrics


def encode_weight(weight: torch.Tensor, codebooks: torch.Tensor, layout: bcq.BCQLayout) -> BCQWeight:
    blocks, row_scale, array_scale = bcq.normalize(weight, layout)
    selectors, indices, _ = bcq.encode_blocks(blocks, codebooks)
    rows = weight.shape[0]
    return BCQWeight(
        indices.reshape(rows, -1).to(torch.uint8), selectors.to(torch.uint8), array_scale, row_scale,
        codebooks.clone(), layout.block_len, layout.array_len, weight.shape[1],
    )  # fmt: skip


def quantize(model: nn.Module, cfg: BCQConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    layout = cfg.layout()
    layout.check()
    linears = list(decoder_linears(model))
    generator = torch.Generator().manual_seed(ctx.seed)
    codebooks, metrics = design_codebooks(model, cfg, bits, ctx, generator)
    start = time.perf_counter()
    for _, parent, attr, module in linears:
        set_quantized_weight(parent, attr, module, encode_weight(module.weight.data, codebooks, layout))
    metrics["bcq_encode_seconds"] = time.perf_counter() - start
    metrics["bcq_effective_bits"] = layout.effective_bits()
    if ctx.act is not None and hasattr(ctx.act, "use_codebooks"):
        ctx.act.use_codebooks(codebooks, layout)
    log.info("bcq: %d codebooks, MSE %s", layout.n_codebooks, {k: round(v, 4) for k, v in metrics.items()})
    artifact = {"layout": asdict(layout), "codebooks": codebooks.int().tolist(), "design": metrics}
    return QuantSummary(metrics=metrics, artifacts={"bcq_codebooks.json": json.dumps(artifact, indent=1)})
