"""ParetoQ (Liu et al., arXiv 2502.02631; code facebookresearch/ParetoQ): quantization-aware training of the
whole network at 1, 1.58, 2, 3 or 4 bits per weight, one learnable step α per output channel.

* Quantizers (§3, the authors' `models/utils_quant.py`): SEQ at 2 bit and ternary, LSQ at 3/4 bit and at 1 bit
  (α·sign) — `methods.core.lsq`, forward and custom backward as the authors wrote them, α initialised as their
  `train.py` does (mean|W| at 1 bit, max|W| at 2 bit/ternary, max|W|/(2^(b−1)−1) at 3/4 bit).
* Training (§4; `1_run_train.sh`): next-token cross-entropy only (no distillation), every parameter trains —
  latent weights, α, and the 16-bit embeddings/lm_head/norms — with AdamW, lr 2e-5, no weight decay, cosine
  schedule without warmup, gradient clipping at 1.0 (the HF Trainer default the authors run under).
* Steps: the paper trains ≤2-bit models 3× as long as 3/4-bit ones (120k vs 40k iterations): `loop.steps` is
  the ≤2-bit count and 3/4 bit run `loop.steps / low_bit_step_ratio`; null = one pass over the training windows
  at ≤2 bit.
* Formats after `convert`: symmetric per-channel int3/int4 codes, a 4-level table α·{±¼, ±¾} at 2 bit, ternary
  (5 trits per byte + fp16 scale ⅔α per row), binary (1 bit + fp16 α per row) — counted truly by the memory report.
* `quantizer: r2q` (2 bit only): R2Q's residual 1-bit pair (`methods.core.r2q`, reconstructed from the public
  description) replaces SEQ — α1, α2 per output channel train with everything else at the same lr; stored as a
  4-level table per row.
Simplified, and why: the paper's data (its pre-training corpus, billions of tokens) is replaced by the harness's
seeded training windows (`train.*`, from a calibration corpus, never the test split) at a CPU budget.
Activations stay 16-bit (the paper is weight-only); a KV-cache plug-in composes after training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core.bits import BitSpec
from methods.core.losses import LossSettings, cross_entropy
from methods.core.lsq import TERNARY, ParetoQWeightQuantizer
from methods.core.params import Valid, added_later, valid
from methods.core.qat import convert, prepare
from methods.core.r2q import R2QWeightQuantizer
from methods.core.trainer import LoopConfig, train

PARETOQ_BITS = (1, TERNARY, 2, 3, 4)
QUANTIZERS = ("paretoq", "r2q")


@dataclass(frozen=True)
class ParetoQConfig:
    # loop.steps: optimizer steps at <= 2 bit (None = one pass over the training windows)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(lr=2e-5, schedule="cosine", max_grad_norm=1.0))
    low_bit_step_ratio: float = valid(3.0, gt=0)  # <=2-bit runs train this many times longer than 3/4-bit runs
    quantizer: str = added_later(
        "paretoq", "paretoq", valid=Valid(choices=QUANTIZERS)
    )  # "paretoq" (SEQ / LSQ by bit width) or "r2q" (2 bit)


def supports(request: Request) -> None:
    bits = request.bits
    if bits.w not in PARETOQ_BITS:
        raise UnsupportedBits(f"paretoq does not support {bits}: weight bits must be one of 1, 1.58, 2, 3, 4")
    if bits.group is not None:
        raise UnsupportedBits(f"paretoq does not support {bits}: its step sizes are per output channel (drop g)")
    if bits.quantizes_activations:
        raise UnsupportedBits(f"paretoq does not support {bits}: it trains weight-only (activations at 16 bit)")


def steps_for(cfg: ParetoQConfig, bits: BitSpec, windows: int) -> int:
    """Optimizer steps for this bit width (0 stays 0: the initialised quantizers alone)."""
    low_bit_steps = cfg.loop.steps if cfg.loop.steps is not None else cfg.loop.one_pass(windows)
    if bits.w <= 2 or low_bit_steps == 0:
        return low_bit_steps
    return max(1, round(low_bit_steps / cfg.low_bit_step_ratio))


def _quantizer_factory(cfg: ParetoQConfig, bits: BitSpec):
    if cfg.quantizer not in QUANTIZERS:
        raise ValueError(f"paretoq quantizer must be one of {', '.join(QUANTIZERS)}, got {cfg.quantizer!r}")
    if cfg.quantizer == "r2q":
        if bits.w != 2:
            raise ValueError(f"paretoq quantizer=r2q is a 2-bit quantizer, not for {bits}: use w2 or quantizer=paretoq")
        return lambda name, weight: R2QWeightQuantizer(weight)
    return lambda name, weight: ParetoQWeightQuantizer(weight, bits.w)


def quantize(model: nn.Module, cfg: ParetoQConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    if not bits.quantizes_weights:
        return QuantSummary()
    windows = ctx.training()
    prepare(model, _quantizer_factory(cfg, bits))
    settings = cfg.loop.settings(steps_for(cfg, bits, windows.shape[0]), r".*", ctx.seed)
    loss_settings = LossSettings(chunk=cfg.loop.loss_chunk)
    checkpoint = Path(ctx.checkpoint_dir) / "paretoq.pt" if ctx.checkpoint_dir else None
    result = train(
        model,
        lambda m, batch: cross_entropy(m, batch, settings=loss_settings),
        windows,
        settings,
        checkpoint_path=checkpoint,
        on_step=ctx.log_step,
    )
    convert(model)
    for param in model.parameters():
        param.requires_grad_(False)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # finished: the run's record holds the result
    notes = {"resumed_from_step": str(result.resumed_from)} if result.resumed_from else {}
    return QuantSummary(notes=notes, metrics=result.metrics())
