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
3. learning (§3.2): next-token cross-entropy of the network with the bit string's activation and KV quantizers
   (straight-through) and 16-bit weights (the authors' GPTQ path: W16A4KV4 while learning), only R1/R2
   trained, by Cayley SGD on the Stiefel manifold (`methods.core.stiefel`) at lr 1.5 with cosine decay and
   gradient-norm clip 1.0 (the authors' trainer's default), 100 steps. The rotations act at the quantizers:
   each quantizer sees T(x) and returns T⁻¹(Q(T x)) (`rotation.RotatedQuantizer`), which has the forward and
   the R-gradient of re-rotating every weight each step, at a fraction of the cost. With 16-bit weights and a
   bit string that quantizes no activations and no KV cache (weight-only), nothing in the loss depends on R, so
   learning would return QuaRot's rotation: there (`loop_weights=auto`; `rtn` forces it, `none` never) the
   weights are RTN-quantized where the rotated network holds them, W ↦ B·Q(Bᵀ W A)·Aᵀ for a linear whose input
   is rotated by A and output by B, straight-through — the authors' code does this whenever its `--w_bits` is
   below 16 during rotation learning (their weight-only and RTN recipes). Their in-loop quantizer searches the
   MSE clip on every forward (`--w_clip`); `loop_w_mse_clip` offers it, off by default (a search over 80 clip
   ratios per group on every forward, for the scales of a rounding whose gradient passes straight through).
   The paper trains on 800 windows of 2048 WikiText-2 train tokens (8 GPUs × batch 1 × 100 steps); the CPU
   default is batch 1 × the run's training windows (`train.seqlen`, 512 on `qat-cpu`) of the calibration
   corpus, 100 steps;
4. fuse the learned R1/R2 exactly as QuaRot fuses its own, install the same online transforms, then quantize
   the weights with QuaRot's settings (GPTQ, symmetric, MSE clip, no act-order; or RTN).
The loss curve from step 0 (QuaRot's rotation) to the end is logged per step.
Simplified: the authors' per-head activation groups at o_proj's input and asymmetric activations come from the
act plug-in here (the same for every method: `act=rtn`, QuaRot's recipe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core.arch import arch_of, decoder_linears
from methods.core.attention import attention_states
from methods.core.bits import BitSpec, check_integer_weight_bits
from methods.core.gptq import GPTQSettings, quantize_rotated_weights
from methods.core.hadamard import hadamard_matrix, hadamard_transform, random_hadamard_matrix
from methods.core.losses import LossSettings, cross_entropy
from methods.core.qlinear import QLinear
from methods.core.quantizers import WeightQuantizer
from methods.core.rotation import (
    CrossHeadTransform,
    RotatedQuantizer,
    fold_norms,
    install_online_transforms,
    rotate_model,
    rotation_refusal,
)
from methods.core.stiefel import CayleySGD, orthogonality_error
from methods.core.trainer import LoopConfig, ParamGroup, TrainSettings, train

VARIANTS = ("had", "no_had")
LOOP_WEIGHTS = ("auto", "rtn", "none")
ROTATIONS = "spinquant_rotations"  # the module holding R1 / R2 on the model while they learn


@dataclass(frozen=True)
class SpinQuantConfig(GPTQSettings):
    variant: str = "had"
    o_proj_heads: bool = True  # QuaRot's online cross-head Hadamard before o_proj (false: the authors' code)
    weights: str = "gptq"  # "gptq" or "rtn" after the rotations are learned
    w_sym: bool = True
    w_mse_clip: bool = True
    act_order: bool = False  # QuaRot's / the authors' GPTQ setting
    w_sym_grid: str = "absmax"
    cayley_iterations: int = 5  # fixed-point steps of the Cayley map (then to convergence); 0 = exact solve
    loop_weights: str = "auto"  # weights while R learns: "none" (16-bit), "rtn", "auto" (module docstring, step 3)
    loop_w_mse_clip: bool = False  # the in-loop RTN's clip search per forward (the authors' code: on; CPU: off)
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


class Rotations(nn.Module):
    """R1 and the per-layer R2s as parameters (trained by Cayley SGD)."""

    def __init__(self, r1: torch.Tensor, r2: list[torch.Tensor]):
        super().__init__()
        self.r1 = nn.Parameter(r1.float().clone())
        self.r2 = nn.ParameterList([nn.Parameter(r.float().clone()) for r in r2])


def initial_rotations(model: nn.Module, seed: int) -> Rotations:
    """QuaRot's: R1 its seeded randomized Hadamard, each R2 the Hadamard of order head_dim."""
    config = model.config
    head_dim = arch_of(model).head_dim(config)
    r1 = random_hadamard_matrix(config.hidden_size, seed)
    return Rotations(r1, [hadamard_matrix(head_dim)] * config.num_hidden_layers)


def _per_head(x: torch.Tensor, rotation: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Each head_dim slice v ↦ v · rotation (over the last dim)."""
    shape = x.shape
    return (x.reshape(*shape[:-1], -1, head_dim) @ rotation.to(x.dtype)).reshape(shape)


def _dense(transform, n: int) -> torch.Tensor:
    """The matrix M with transform(x) = x M."""
    return transform(torch.eye(n, dtype=torch.float64))


@dataclass(frozen=True)
class Frame:
    """Where one linear sits in the rotated network, as maps over a tensor's last dim: its input is x·A there
    (`into`: x ↦ xA, `back`: y ↦ yAᵀ) and its output y·B (`out_into`: z ↦ zB, `out_back`: z ↦ zBᵀ)."""

    into: Callable[[torch.Tensor], torch.Tensor]
    back: Callable[[torch.Tensor], torch.Tensor]
    out_into: Callable[[torch.Tensor], torch.Tensor] = lambda z: z
    out_back: Callable[[torch.Tensor], torch.Tensor] = lambda z: z

    def rotated_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W' = Bᵀ·W·A: the weight the rotated network holds (y' = x'·W'ᵀ)."""
        return self.out_into(self.into(weight).T).T

    def unrotated_weight(self, rotated: torch.Tensor) -> torch.Tensor:
        """W = B·W'·Aᵀ, the inverse of `rotated_weight`."""
        return self.out_back(self.back(rotated).T).T


def linear_frames(model: nn.Module, rotations: Rotations, cfg: SpinQuantConfig) -> list[tuple[nn.Module, Frame]]:
    """Every decoder linear with its frame under R1/R2 and (`had`) the online transforms. Requires norms folded."""
    arch = arch_of(model)
    config = model.config
    head_dim = arch.head_dim(config)
    had = cfg.variant == "had"
    mixer = _dense(CrossHeadTransform(arch.num_heads(config), head_dim), config.hidden_size).float()
    h_down = _dense(hadamard_transform, config.intermediate_size).float()
    residual = {  # writers of the residual stream: y ↦ y R1
        "out_into": lambda z: z @ rotations.r1.to(z.dtype),
        "out_back": lambda z: z @ rotations.r1.T.to(z.dtype),
    }
    frames = []
    for layer_index, layer in enumerate(arch.layers(model)):
        r2 = rotations.r2[layer_index]
        attn, mlp = arch.attention(layer), arch.mlp(layer)
        mix = mixer if cfg.o_proj_heads and had else torch.eye(config.hidden_size)
        for linear in arch.residual_readers(layer):  # x ↦ x R1
            frame = Frame(lambda x: x @ rotations.r1.to(x.dtype), lambda y: y @ rotations.r1.T.to(y.dtype))
            if linear is attn.v_proj:  # its output heads ↦ head · R2ᵀ
                frame = Frame(
                    frame.into,
                    frame.back,
                    lambda z, r=r2: _per_head(z, r.T, head_dim),
                    lambda z, r=r2: _per_head(z, r, head_dim),
                )
            frames.append((linear, frame))
        o_frame = Frame(  # heads ↦ head · R2ᵀ, then (optionally) mixed across heads; writes the residual
            lambda x, r=r2, m=mix: _per_head(x, r.T, head_dim) @ m.to(x.dtype),
            lambda y, r=r2, m=mix: _per_head(y @ m.T.to(y.dtype), r, head_dim),
            **residual,
        )
        down_into = (lambda x: x @ h_down.to(x.dtype)) if had else (lambda x: x)  # R4
        down_back = (lambda y: y @ h_down.T.to(y.dtype)) if had else (lambda y: y)
        frames += [(attn.o_proj, o_frame), (mlp.down_proj, Frame(down_into, down_back, **residual))]
    return frames


def wrap_quantizers(model: nn.Module, rotations: Rotations, cfg: SpinQuantConfig) -> None:
    """Put every attached act/KV quantizer behind the rotation its position sees in the rotated model, with a
    straight-through Q (module docstring, step 3). Requires the act/KV plug-ins attached and norms folded."""
    arch = arch_of(model)
    head_dim = arch.head_dim(model.config)
    h_qk = _dense(hadamard_transform, head_dim).float()
    for linear, frame in linear_frames(model, rotations, cfg):
        if isinstance(linear, QLinear) and linear.act_quant is not None:
            linear.act_quant = RotatedQuantizer(linear.act_quant, frame.into, frame.back)
    for layer_index, state in enumerate(attention_states(model)):
        r2 = rotations.r2[layer_index]
        if cfg.variant == "had":
            state.qk_transform = lambda x, m=h_qk: x @ m.to(x.dtype)  # R3 (exact: the same on queries and keys)
        if state.key_quant is not None:
            state.key_quant = RotatedQuantizer(state.key_quant, lambda x: x, lambda y: y)
        if state.value_quant is not None:
            state.value_quant = RotatedQuantizer(
                state.value_quant, lambda v, r=r2: v @ r.T.to(v.dtype), lambda y, r=r2: y @ r.to(y.dtype)
            )


class _RotatedWeightQuant(nn.Module):
    """A parametrization: W ↦ B·Q(Bᵀ·W·A)·Aᵀ, the weight fake-quantized where the rotated network holds it,
    straight-through. The frame's maps hold the rotations by closure, so R1/R2 keep their one parameter name."""

    def __init__(self, frame: Frame, quantizer: WeightQuantizer):
        super().__init__()
        self.frame, self.quantizer = frame, quantizer

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rotated = self.frame.rotated_weight(weight.to(torch.promote_types(weight.dtype, torch.float32)))
        return self.frame.unrotated_weight(self.quantizer.straight_through(rotated)).to(weight.dtype)


def wrap_weights(model: nn.Module, rotations: Rotations, cfg: SpinQuantConfig, bits: BitSpec) -> None:
    """Weights RTN-quantized in the rotated basis while R learns (`loop_weights` "rtn")."""
    quantizer = WeightQuantizer(
        int(bits.w), bits.group, sym=cfg.w_sym, mse_clip=cfg.loop_w_mse_clip, sym_grid=cfg.w_sym_grid
    )
    for linear, frame in linear_frames(model, rotations, cfg):
        parametrize.register_parametrization(linear, "weight", _RotatedWeightQuant(frame, quantizer), unsafe=True)


def unwrap_weights(model: nn.Module) -> None:
    for _, _, _, module in decoder_linears(model):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def loop_weights(cfg: SpinQuantConfig, bits: BitSpec) -> str:
    """The weights R learns against: `cfg.loop_weights`, "auto" resolved (module docstring, step 3)."""
    if cfg.loop_weights not in LOOP_WEIGHTS:
        raise ValueError(f"spinquant loop_weights must be one of {', '.join(LOOP_WEIGHTS)}, got {cfg.loop_weights!r}")
    if cfg.loop_weights != "auto":
        return cfg.loop_weights if bits.quantizes_weights else "none"
    return "rtn" if bits.quantizes_weights and bits.a >= 16 and bits.kv >= 16 else "none"


def unwrap_quantizers(model: nn.Module) -> None:
    """Detach every quantizer and the training-time R3 (the runner attaches the plug-ins to the final model)."""
    for _, _, _, module in decoder_linears(model):
        if isinstance(module, QLinear):
            module.act_quant = None
    for state in attention_states(model):
        state.qk_transform = None
        state.set_kv(None, None, state.keys_pre_rope)


def learn_rotations(model: nn.Module, cfg: SpinQuantConfig, ctx: QuantContext, bits: BitSpec) -> tuple[Rotations, dict]:
    """Steps 1–3: returns the learned rotations and the training metrics."""
    fold_norms(model)
    rotations = initial_rotations(model, ctx.seed)
    for quantizer in (ctx.act, ctx.kv):
        if quantizer is not None:
            quantizer.attach(model)
    wrap_quantizers(model, rotations, cfg)
    if loop_weights(cfg, bits) == "rtn":
        wrap_weights(model, rotations, cfg, bits)
    setattr(model, ROTATIONS, rotations)
    steps = cfg.loop.steps if cfg.loop.steps is not None else cfg.loop.one_pass(ctx.training().shape[0])
    settings = TrainSettings(
        steps=steps,
        batch_size=cfg.loop.batch_size,
        grad_accum=cfg.loop.grad_accum,
        groups=(ParamGroup(rf"^{ROTATIONS}\.", cfg.loop.lr, optimizer="cayley"),),
        schedule=cfg.loop.schedule,
        warmup_steps=cfg.loop.warmup_steps,
        max_grad_norm=cfg.loop.max_grad_norm,
        seed=ctx.seed,
        checkpoint_every=cfg.loop.checkpoint_every,
    )
    checkpoint = Path(ctx.checkpoint_dir) / "spinquant.pt" if ctx.checkpoint_dir else None
    loss_settings = LossSettings(chunk=cfg.loop.loss_chunk)
    try:
        result = train(
            model,
            lambda m, batch: cross_entropy(m, batch, settings=loss_settings),
            ctx.training() if steps else torch.zeros(1, 2, dtype=torch.long),
            settings,
            checkpoint_path=checkpoint,
            optimizers={"cayley": lambda groups: CayleySGD(groups, iterations=cfg.cayley_iterations)},
            on_step=ctx.log_step,
        )
    finally:
        delattr(model, ROTATIONS)
        unwrap_weights(model)
        unwrap_quantizers(model)
        for param in model.parameters():
            param.requires_grad_(False)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    metrics = result.metrics()
    metrics["rotation_orthogonality_error"] = max(orthogonality_error(r) for r in [rotations.r1, *rotations.r2])
    return rotations, metrics


def quantize(model: nn.Module, cfg: SpinQuantConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    if cfg.variant not in VARIANTS:
        raise ValueError(f"spinquant variant must be one of {', '.join(VARIANTS)}, got {cfg.variant!r}")
    if cfg.weights not in ("gptq", "rtn"):
        raise ValueError(f"spinquant weights must be 'gptq' or 'rtn', got {cfg.weights!r}")
    rotations, metrics = learn_rotations(model, cfg, ctx, bits)
    rotate_model(model, rotations.r1.detach().double(), [r.detach().double() for r in rotations.r2])
    notes = install_online_transforms(model, cross_heads=cfg.o_proj_heads) if cfg.variant == "had" else {}
    summary = QuantSummary(notes={**notes, "loop_weights": loop_weights(cfg, bits)}, metrics=metrics)
    summary.metrics.update(quantize_rotated_weights(model, bits, cfg, ctx.calibration))
    return summary
