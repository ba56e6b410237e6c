"""SpinQuant (Liu et al., arXiv 2405.16406; code facebookresearch/SpinQuant): learned rotations for W4A4KV4.

Pipeline:
1. fold RMSNorm gains into the next linears and untie embeddings (function-preserving; the authors' norm fusion
   also subtracts the embedding mean, which is not function-preserving under RMSNorm — their issue #14 — and is
   not done here);
2. R1 (hidden × hidden, residual stream) and one R2 per layer (head_dim × head_dim, shared by the layer's value
   heads) as trainable rotations, both starting from QuaRot's: R1 = its seeded randomized Hadamard, R2 = the
   Hadamard — so step 0 is QuaRot's rotation (a test); R3 (queries/keys after RoPE) and R4 (before down_proj)
   are fixed online Hadamards (`variant=had`); `no_had` drops every online transform (R1, R2 only: the paper's
   weight-only / W4A8 variant, not in the authors' code). With `had`, QuaRot's online cross-head Hadamard before
   o_proj is kept by default (`o_proj_heads`), so step 0 equals QuaRot; the authors' code has R2 only there
   (`o_proj_heads=false`);
3. learning (§3.2; `methods.core.learned_rotation`, shared with RCP's `rotation=spinquant`): next-token
   cross-entropy of the network with the bit string's activation and KV quantizers (straight-through) and 16-bit
   weights (the authors' GPTQ path: W16A4KV4 while learning), only R1/R2 trained, by Cayley SGD on the Stiefel
   manifold (`methods.core.stiefel`) at lr 1.5 with cosine decay and gradient-norm clip 1.0 (the authors' trainer's
   default), 100 steps. The rotations act at the quantizers: each quantizer sees T(x) and returns T⁻¹(Q(T x))
   (`rotation.RotatedQuantizer`), which has the forward and the R-gradient of re-rotating every weight each step, at
   a fraction of the cost. With 16-bit weights and a bit string that quantizes no activations and no KV cache
   (weight-only), nothing in the loss depends on R, so learning would return QuaRot's rotation: there
   (`loop_weights=auto`; `rtn` forces it, `none` never) the weights are RTN-quantized where the rotated network
   holds them, W ↦ B·Q(Bᵀ W A)·Aᵀ for a linear whose input is rotated by A and output by B, straight-through — the
   authors' code does this whenever its `--w_bits` is below 16 during rotation learning (their weight-only and RTN
   recipes). Their in-loop quantizer searches the MSE clip on every forward (`--w_clip`); `loop_w_mse_clip` offers
   it, off by default (a search over 80 clip ratios per group on every forward, for the scales of a rounding whose
   gradient passes straight through). The paper trains on 800 windows of 2048 WikiText-2 train tokens (8 GPUs ×
   batch 1 × 100 steps); the CPU default is batch 1 × the run's training windows (`train.seqlen`, 512 on `qat-cpu`)
   of the calibration corpus, 100 steps;
4. fuse the learned R1/R2 exactly as QuaRot fuses its own, install the same online transforms, then quantize
   the weights with QuaRot's settings (GPTQ, symmetric, MSE clip, no act-order; or RTN).
The loss curve from step 0 (QuaRot's rotation) to the end is logged per step.
Simplified: the authors' per-head activation groups at o_proj's input and asymmetric activations come from the
act plug-in here (the same for every method: `act=rtn`, QuaRot's recipe).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core.bits import BitSpec, check_integer_weight_bits
from methods.core.gptq import GPTQSettings, quantize_rotated_weights
from methods.core.learned_rotation import RotationLearning, fuse, learn_rotations
from methods.core.params import flag, valid
from methods.core.quantizers import SYM_GRIDS, WeightQuantizer
from methods.core.rotation import rotation_refusal
from methods.core.trainer import LoopConfig

VARIANTS = ("had", "no_had")
LOOP_WEIGHTS = ("auto", "rtn", "none")


@dataclass(frozen=True)
class SpinQuantConfig(GPTQSettings):
    variant: str = valid("had", choices=VARIANTS)
    o_proj_heads: bool = flag(True)  # QuaRot's online cross-head Hadamard before o_proj (false: the authors' code)
    weights: str = valid("gptq", choices=("gptq", "rtn"))  # "gptq" or "rtn" after the rotations are learned
    w_sym: bool = flag(True)
    w_mse_clip: bool = flag(True)
    act_order: bool = flag(False)  # QuaRot's / the authors' GPTQ setting
    w_sym_grid: str = valid("absmax", choices=SYM_GRIDS)
    cayley_iterations: int = valid(
        5, ge=0
    )  # fixed-point steps of the Cayley map (then to convergence); 0 = exact solve
    loop_weights: str = valid(
        "auto", choices=LOOP_WEIGHTS
    )  # weights while R learns: "none" (16-bit), "rtn", "auto" (module docstring, step 3)
    loop_w_mse_clip: bool = flag(False)  # the in-loop RTN's clip search per forward (the authors' code: on; CPU: off)
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(steps=100, batch_size=1, lr=1.5, schedule="cosine", max_grad_norm=1.0)
    )


def supports(request: Request) -> None:
    check_integer_weight_bits(request.bits, "spinquant", UnsupportedBits)
    refusal = rotation_refusal("spinquant", request.arch, request.kv)
    if refusal:
        raise UnsupportedBits(refusal)
    for plugin in (request.act, request.kv):
        if plugin is not None and plugin.needs_calibration:
            raise UnsupportedBits(
                "spinquant learns its rotations with dynamic act/KV quantizers in the loss; a plug-in that needs "
                "calibration would be fitted on the unrotated model: use act=rtn / kv=rtn"
            )


def loop_weights(cfg: SpinQuantConfig, bits: BitSpec) -> str:
    """The weights R learns against: `cfg.loop_weights`, "auto" resolved (module docstring, step 3)."""
    if cfg.loop_weights not in LOOP_WEIGHTS:
        raise ValueError(f"spinquant loop_weights must be one of {', '.join(LOOP_WEIGHTS)}, got {cfg.loop_weights!r}")
    if cfg.loop_weights != "auto":
        return cfg.loop_weights if bits.quantizes_weights else "none"
    return "rtn" if bits.quantizes_weights and bits.a >= 16 and bits.kv >= 16 else "none"


def learning(cfg: SpinQuantConfig) -> RotationLearning:
    """The shared learner's settings from this method's flat config."""
    return RotationLearning(cfg.variant == "had", cfg.o_proj_heads, cfg.cayley_iterations, cfg.loop)


def loop_quantizer(cfg: SpinQuantConfig, bits: BitSpec) -> WeightQuantizer | None:
    """RTN in the rotated basis while R learns, when `loop_weights` resolves to "rtn"; else 16-bit weights."""
    if loop_weights(cfg, bits) != "rtn":
        return None
    return WeightQuantizer(
        int(bits.w), bits.group, sym=cfg.w_sym, mse_clip=cfg.loop_w_mse_clip, sym_grid=cfg.w_sym_grid
    )


def quantize(model: nn.Module, cfg: SpinQuantConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    if cfg.variant not in VARIANTS:
        raise ValueError(f"spinquant variant must be one of {', '.join(VARIANTS)}, got {cfg.variant!r}")
    if cfg.weights not in ("gptq", "rtn"):
        raise ValueError(f"spinquant weights must be 'gptq' or 'rtn', got {cfg.weights!r}")
    checkpoint = Path(ctx.checkpoint_dir) / "spinquant.pt" if ctx.checkpoint_dir else None
    rotations, metrics = learn_rotations(
        model,
        learning(cfg),
        (ctx.act, ctx.kv),
        ctx.training,
        ctx.seed,
        loop_quantizer(cfg, bits),
        checkpoint,
        ctx.log_step,
    )
    notes = fuse(model, rotations, cfg.variant == "had", cfg.o_proj_heads)
    summary = QuantSummary(notes={**notes, "loop_weights": loop_weights(cfg, bits)}, metrics=metrics)
    summary.metrics.update(quantize_rotated_weights(model, bits, cfg, ctx.calibration))
    return summary
