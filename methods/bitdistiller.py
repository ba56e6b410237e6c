"""BitDistiller (Du et al., arXiv 2402.10631; code DD-DuDa/BitDistiller): QAT with self-distillation at 2–4 bits.

1. Clipping initialisation (§3.1, `quantization/autoclip.py`): AWQ's asymmetric clip search per (row, group) on
   calibration activations, q/k skipped — `methods.core.clip_search` — and the weights clamped to it.
2. Quantizer during training (`quantization/quantizer.py`, SteInt{2,3}AsymQuantizer): asymmetric min/max grid of
   each group of the current latent weight (no learnable parameter; the clamp of step 1 sets the initial range),
   rounding half away from zero with a straight-through gradient.
3. Self-distillation (§3.2): the FP teacher completes prompts from the training corpus (temperature 0.7) —
   `methods.core.selfdistill` — and every decoder weight is trained (embeddings, lm_head and norms stay 16-bit
   and frozen) to minimise the confidence-aware KL (CAKLD) to the teacher, γ = the teacher's mean top-1
   probability on the first `cakld_batches` batches (computed over scored tokens; the authors' off-by-one
   variant is logged beside it).
4. Defaults (`train/train.sh`, README): AdamW lr 8e-6, constant schedule, no weight decay; the authors train 4
   epochs at batch 128 on 8,000 generations of up to 1,024 new tokens — we take a CPU budget (`loop.steps`,
   `generation.*`, `train.seqlen`) and say so in the run's metrics. `loop.steps: 0` records the clipping alone.
`quant_type: r2q` (2 bits): R2Q's residual 1-bit pair (`methods.core.r2q`, reconstructed from the public
description) replaces the asymmetric INT2 grid — the clip search scores clips with R2Q's greedy grid (as `nf3`
with its own), α1/α2 start greedy from the clipped weights and train with the weights at `loop.lr`; stored as a
4-level table per group. `method=r2q` is this configuration.
`quant_type: nf3` (3 bits): the authors' NF3 table, positive weights scaled by the group max and negative ones
by |min| (`SignedLUTWeight`: codes + table + two fp16 scales per group; no packed kernel yet, so "no kernel").
Simplified, and why: no Alpaca prompts (not in the offline mirror); sequences packed into fixed windows rather
than padded (no padding to mask).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core.bits import BitSpec
from methods.core.clip_search import (
    ClipSearchSettings,
    asym_minmax_fake_quant,
    clip_model_weights,
    pad_groups_replicating,
)
from methods.core.formats import QuantizedWeight, SignedLUTWeight
from methods.core.losses import KL_KINDS, LossSettings, distillation, teacher_confidence
from methods.core.params import flag, valid
from methods.core.qat import convert, prepare
from methods.core.r2q import R2QWeightQuantizer, greedy_fake_quant
from methods.core.selfdistill import GenerationSettings, cached_generations, pack, select_prompts
from methods.core.trainer import LoopConfig, ParamGroup, batch_at, train

BITDISTILLER_BITS = (2, 3, 4)
QUANT_TYPES = ("int", "nf3", "r2q")  # nf3 at 3 bits, r2q at 2
R2Q_SCALES = r"weight_quantizer\.alpha[12]$"  # quant_type=r2q: its α1, α2 train with the weights, at their lr


@dataclass(frozen=True)
class BitDistillerConfig:
    quant_type: str = valid("int", choices=QUANT_TYPES)  # "int" (asymmetric uniform) or "nf3" (3 bits only)
    clip: bool = flag(True)
    clip_search: ClipSearchSettings = field(default_factory=ClipSearchSettings)
    data: str = valid(
        "teacher", choices=("teacher", "corpus")
    )  # "teacher": self-distillation generations; "corpus": the plain training windows
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    kd_loss: str = valid("cakld", choices=KL_KINDS)  # cakld | forward | reverse
    cakld_batches: int = valid(10, ge=1)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(lr=8e-6, schedule="constant"))


@dataclass(frozen=True)
class R2QConfig(BitDistillerConfig):
    """`method=r2q`: BitDistiller's self-distillation QAT with R2Q's quantizer (`methods.core.r2q`). R2Q is a
    quantizer meant to drop into a QAT framework; of the two here, BitDistiller's runs both of the paper's
    granularities (per group and per channel: ParetoQ's trainer is per channel only) and starts from a clip
    search, the closer match to a plug-in for an existing 2-bit recipe."""

    quant_type: str = valid("r2q", choices=QUANT_TYPES)


def supports_r2q(request: Request) -> None:
    if request.bits.w != 2:
        raise UnsupportedBits(f"r2q does not support {request.bits}: it is a 2-bit quantizer (w2)")
    supports(request)


def supports(request: Request) -> None:
    bits = request.bits
    if bits.w not in BITDISTILLER_BITS:
        raise UnsupportedBits(f"bitdistiller does not support {bits}: weight bits must be one of 2, 3, 4")
    if bits.quantizes_activations:
        raise UnsupportedBits(f"bitdistiller does not support {bits}: it quantizes weights only (use a16)")


def _weight_quantizer(cfg: BitDistillerConfig, bits: int, group: int, weight: torch.Tensor) -> nn.Module:
    if cfg.quant_type == "int":
        return AsymMinMaxSTE(bits, group)
    if cfg.quant_type == "nf3" and bits == 3:
        return NF3STE(group)
    if cfg.quant_type == "r2q" and bits == 2:
        return R2QWeightQuantizer(weight, group)
    raise ValueError(
        f"bitdistiller quant_type must be 'int', 'nf3' at 3 bits or 'r2q' at 2 bits; got {cfg.quant_type!r} at {bits}"
    )


def _clip_grid(cfg: BitDistillerConfig, bits: int):
    """The grid the clip search scores candidate clips with: the quantizer that then trains."""
    if cfg.quant_type == "nf3":
        return NF3STE(1).fake_quant
    if cfg.quant_type == "r2q":
        return greedy_fake_quant
    return lambda groups: asym_minmax_fake_quant(groups, bits)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


NF3_LEVELS = (
    -1.0,
    -0.5350227355957031,
    -0.2469314038753510,
    0.0,
    0.1833375245332718,
    0.3819939494132996,
    0.6229856610298157,
    1.0,
)  # the authors' `SteN2F3Quantizer` table; their thresholds are the midpoints


def _nearest_level(q: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (levels ascending), ties toward the upper level as the authors' `>=` does."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(q, midpoints, right=True)


class NF3STE(nn.Module):
    """BitDistiller's NF3 ("n2f3") training quantizer: per group, w ≥ 0 is scaled by max and w < 0 by |min|, each
    rounded to the nearest of the 8 table levels, straight through. Deviation: scales are floored at 1e-5 (the
    code divides by zero for a group whose max or min is exactly 0)."""

    bits = 3

    def __init__(self, group: int):
        super().__init__()
        self.group = group
        self.register_buffer("levels", torch.tensor(NF3_LEVELS), persistent=False)

    def _scales(self, grouped: torch.Tensor):
        pos = grouped.amax(-1, keepdim=True).abs().clamp(min=1e-5).detach()
        neg = grouped.amin(-1, keepdim=True).abs().clamp(min=1e-5).detach()
        return pos, neg

    def _codes(self, grouped: torch.Tensor) -> torch.Tensor:
        pos, neg = self._scales(grouped)
        q = torch.where(grouped >= 0, grouped / pos, grouped / neg)
        return _nearest_level(q, self.levels)

    def fake_quant(self, grouped: torch.Tensor) -> torch.Tensor:
        """Quantized values of groups along the last dim (no gradient path; the clip search's grid)."""
        pos, neg = self._scales(grouped)
        level = self.levels[self._codes(grouped)]
        return level * torch.where(level < 0, neg, pos)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows, cols = weight.shape
        grouped = pad_groups_replicating(weight, self.group)
        pos, neg = self._scales(grouped)
        q = torch.where(grouped >= 0, grouped / pos, grouped / neg)
        level = self.levels[_nearest_level(q.detach(), self.levels)]
        q = q + (level - q).detach()
        return (q * torch.where(grouped >= 0, pos, neg)).reshape(rows, -1)[:, :cols]

    @torch.no_grad()
    def freeze(self, weight: torch.Tensor) -> SignedLUTWeight:
        rows, cols = weight.shape
        grouped = pad_groups_replicating(weight.float(), self.group)
        pos, neg = self._scales(grouped)
        codes = self._codes(grouped).reshape(rows, -1)[:, :cols]
        return SignedLUTWeight(
            codes.to(torch.uint8), self.levels.clone(), neg.squeeze(-1), pos.squeeze(-1), 3, self.group
        )


class AsymMinMaxSTE(nn.Module):
    """BitDistiller's training quantizer: per-group min/max asymmetric grid, straight-through rounding."""

    def __init__(self, bits: int, group: int):
        super().__init__()
        self.bits, self.group = bits, group

    def _grid(self, grouped: torch.Tensor):
        max_int = 2**self.bits - 1
        max_val, min_val = grouped.amax(-1, keepdim=True), grouped.amin(-1, keepdim=True)
        scales = ((max_val - min_val).clamp(min=1e-5) / max_int).detach()
        zeros = (-torch.round(min_val / scales)).clamp(0, max_int).detach()
        return scales, zeros, max_int

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows, cols = weight.shape
        grouped = pad_groups_replicating(weight, self.group)
        scales, zeros, max_int = self._grid(grouped)
        x = grouped / scales
        rounded = x + (_round_half_away(x) - x).detach()
        fake = (torch.clamp(rounded + zeros, 0, max_int) - zeros) * scales
        return fake.reshape(rows, -1)[:, :cols]

    @torch.no_grad()
    def freeze(self, weight: torch.Tensor) -> QuantizedWeight:
        rows, cols = weight.shape
        grouped = pad_groups_replicating(weight.float(), self.group)
        scales, zeros, max_int = self._grid(grouped)
        codes = torch.clamp(_round_half_away(grouped / scales) + zeros, 0, max_int).reshape(rows, -1)[:, :cols]
        return QuantizedWeight(
            codes.to(torch.uint8), scales.squeeze(-1), zeros.squeeze(-1), self.bits, False, self.group
        )


def _training_windows(model, teacher, cfg: BitDistillerConfig, ctx: QuantContext, metrics: dict) -> torch.Tensor:
    corpus = ctx.training()
    if cfg.data == "corpus":
        return corpus
    if cfg.data != "teacher":
        raise ValueError(f"bitdistiller data must be 'teacher' or 'corpus', got {cfg.data!r}")
    prompts = select_prompts(ctx.training_rows(), cfg.generation, ctx.seed)
    cache = ctx.cache_dir or str(Path(ctx.checkpoint_dir or ".") / "cache")
    sequences, cached = cached_generations(teacher, ctx.tokenizer, prompts, cfg.generation, ctx.seed, cache)
    metrics.update({"selfdistill_prompts": float(len(prompts)), "selfdistill_cached": float(cached)})
    windows = pack(sequences, corpus.shape[1], ctx.tokenizer.eos_token_id)
    return windows[: corpus.shape[0]]


def quantize(model: nn.Module, cfg: BitDistillerConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    if not bits.quantizes_weights:
        return QuantSummary()
    if cfg.kd_loss not in KL_KINDS:
        raise ValueError(f"bitdistiller kd_loss must be one of {', '.join(KL_KINDS)}, got {cfg.kd_loss!r}")
    metrics: dict[str, float] = {}
    teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the FP model, before any clipping
    _weight_quantizer(cfg, int(bits.w), 1, torch.zeros(1, 1))  # a wrong quant_type fails before any work
    if cfg.clip:
        grid = _clip_grid(cfg, int(bits.w))
        metrics.update(clip_model_weights(model, ctx.calibration(), grid, bits.group, cfg.clip_search))
    prepare(model, lambda name, weight: _weight_quantizer(cfg, int(bits.w), bits.group or weight.shape[1], weight))
    loop = cfg.loop
    windows = _training_windows(model, teacher, cfg, ctx, metrics) if loop.steps != 0 else None
    if windows is not None:
        steps = loop.steps if loop.steps is not None else loop.one_pass(windows.shape[0])
        gamma_batches = [batch_at(windows, k, loop.batch_size, ctx.seed) for k in range(cfg.cakld_batches)]
        confidence = teacher_confidence(teacher, gamma_batches, chunk=loop.loss_chunk)
        metrics.update({"cakld_gamma": confidence.gamma, "cakld_gamma_reference_code": confidence.gamma_reference_code})
        loss_settings = LossSettings(chunk=loop.loss_chunk)
        scales = (ParamGroup(R2Q_SCALES, loop.lr, loop.weight_decay),) if cfg.quant_type == "r2q" else ()
        settings = loop.settings(steps, r"layers\..*\.weight$", ctx.seed, scales)
        checkpoint = Path(ctx.checkpoint_dir) / "bitdistiller.pt" if ctx.checkpoint_dir else None
        result = train(
            model,
            lambda m, batch: distillation(m, teacher, batch, cfg.kd_loss, confidence.gamma, settings=loss_settings),
            windows,
            settings,
            checkpoint_path=checkpoint,
            on_step=ctx.log_step,
        )
        metrics.update(result.metrics())
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)
    convert(model)
    model.requires_grad_(False)
    return QuantSummary(metrics=metrics)
