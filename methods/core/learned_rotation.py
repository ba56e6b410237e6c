"""Learned rotations R1/R2 (SpinQuant, Liu et al., arXiv 2405.16406 §3.2; code facebookresearch/SpinQuant): the
rotations as trainable orthogonal matrices, where each linear and each act/KV quantizer sits under them, and their
learning by Cayley SGD on the Stiefel manifold. `methods.spinquant` runs this before GPTQ; `methods.rcp`
(`rotation=spinquant`) before its clip and partition. Norms must be folded first (`rotation.fold_norms`).

Learning: next-token cross-entropy of the network with its act/KV quantizers (straight-through) in the loop and
the weights 16-bit or, when given a weight quantizer, RTN-quantized where the rotated network holds them
(W ↦ B·Q(Bᵀ W A)·Aᵀ for a linear whose input is rotated by A and output by B); only R1/R2 train. The rotations act
at the quantizers: each sees T(x) and returns T⁻¹(Q(T x)) (`rotation.RotatedQuantizer`), which has the forward
and the R-gradient of re-rotating every weight each step at a fraction of the cost. Start: QuaRot's rotation
(R1 its seeded randomized Hadamard, each R2 the Hadamard), so zero steps give QuaRot's model. `online` adds the
fixed online Hadamards R3 (queries/keys after RoPE) and R4 (before down_proj), and with `o_proj_heads` QuaRot's
cross-head mixing before o_proj.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from methods.core.arch import arch_of, decoder_linears
from methods.core.attention import attention_states
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
)
from methods.core.stiefel import CayleySGD, orthogonality_error
from methods.core.trainer import LoopConfig, ParamGroup, train

ROTATIONS = "learned_rotations"  # the module holding R1 / R2 on the model while they learn


@dataclass(frozen=True)
class RotationLearning:
    """How R1/R2 learn: `online` R3/R4 (SpinQuant's `had`; false: `no_had`), QuaRot's cross-head mixing before
    o_proj (`o_proj_heads`), the Cayley map's fixed-point steps (0 = exact solve) and the loop (SpinQuant's
    trainer defaults: 100 steps, batch 1, lr 1.5, cosine, gradient-norm clip 1.0)."""

    online: bool = True
    o_proj_heads: bool = True
    cayley_iterations: int = 5
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(steps=100, batch_size=1, lr=1.5, schedule="cosine", max_grad_norm=1.0)
    )


class Rotations(nn.Module):
    """R1 and the per-layer R2s as parameters (trained by Cayley SGD)."""

    def __init__(self, r1: torch.Tensor, r2: list[torch.Tensor]):
        super().__init__()
        self.r1 = nn.Parameter(r1.float().clone())
        self.r2 = nn.ParameterList([nn.Parameter(r.float().clone()) for r in r2])

    def orthogonality_error(self) -> float:
        return max(orthogonality_error(r) for r in [self.r1, *self.r2])


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


def linear_frames(
    model: nn.Module, rotations: Rotations, online: bool, o_proj_heads: bool
) -> list[tuple[nn.Module, Frame]]:
    """Every decoder linear with its frame under R1/R2 and (`online`) the online transforms. Norms folded."""
    arch = arch_of(model)
    config = model.config
    head_dim = arch.head_dim(config)
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
        mix = mixer if o_proj_heads and online else torch.eye(config.hidden_size)
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
        down_into = (lambda x: x @ h_down.to(x.dtype)) if online else (lambda x: x)  # R4
        down_back = (lambda y: y @ h_down.T.to(y.dtype)) if online else (lambda y: y)
        frames += [(attn.o_proj, o_frame), (mlp.down_proj, Frame(down_into, down_back, **residual))]
    return frames


def wrap_quantizers(model: nn.Module, rotations: Rotations, online: bool, o_proj_heads: bool) -> None:
    """Put every attached act/KV quantizer behind the rotation its position sees in the rotated model, with a
    straight-through Q. Requires the act/KV plug-ins attached and norms folded."""
    arch = arch_of(model)
    head_dim = arch.head_dim(model.config)
    h_qk = _dense(hadamard_transform, head_dim).float()
    for linear, frame in linear_frames(model, rotations, online, o_proj_heads):
        if isinstance(linear, QLinear) and linear.act_quant is not None:
            linear.act_quant = RotatedQuantizer(linear.act_quant, frame.into, frame.back)
    for layer_index, state in enumerate(attention_states(model)):
        r2 = rotations.r2[layer_index]
        if online:
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


def wrap_weights(
    model: nn.Module, rotations: Rotations, online: bool, o_proj_heads: bool, quantizer: WeightQuantizer
) -> None:
    """Weights fake-quantized by `quantizer` in the rotated basis while R learns."""
    for linear, frame in linear_frames(model, rotations, online, o_proj_heads):
        parametrize.register_parametrization(linear, "weight", _RotatedWeightQuant(frame, quantizer), unsafe=True)


def unwrap_weights(model: nn.Module) -> None:
    for _, _, _, module in decoder_linears(model):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def unwrap_quantizers(model: nn.Module) -> None:
    """Detach every quantizer and the training-time R3 (the caller attaches the plug-ins to the final model)."""
    for _, _, _, module in decoder_linears(model):
        if isinstance(module, QLinear):
            module.act_quant = None
    for state in attention_states(model):
        state.qk_transform = None
        state.set_kv(None, None, state.keys_pre_rope)


def learn_rotations(
    model: nn.Module,
    settings: RotationLearning,
    plugins: tuple,
    training: Callable[[], torch.Tensor],
    seed: int,
    weight_quantizer: WeightQuantizer | None = None,
    checkpoint_path: Path | None = None,
    log_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Rotations, dict[str, float]]:
    """Fold norms, learn R1/R2 from QuaRot's start (module docstring) with the act/KV `plugins` (None entries
    skipped) attached in the loop and `weight_quantizer` (None: 16-bit weights); detach them again. Returns the
    rotations (not yet fused: `fuse`) and the training metrics."""
    fold_norms(model)
    rotations = initial_rotations(model, seed)
    for plugin in plugins:
        if plugin is not None:
            plugin.attach(model)
    wrap_quantizers(model, rotations, settings.online, settings.o_proj_heads)
    if weight_quantizer is not None:
        wrap_weights(model, rotations, settings.online, settings.o_proj_heads, weight_quantizer)
    setattr(model, ROTATIONS, rotations)
    loop = settings.loop
    steps = loop.steps if loop.steps is not None else loop.one_pass(training().shape[0])
    pattern = rf"^{ROTATIONS}\."
    train_settings = replace(
        loop.settings(steps, pattern, seed), groups=(ParamGroup(pattern, loop.lr, optimizer="cayley"),)
    )
    loss_settings = LossSettings(chunk=loop.loss_chunk)
    try:
        result = train(
            model,
            lambda m, batch: cross_entropy(m, batch, settings=loss_settings),
            training() if steps else torch.zeros(1, 2, dtype=torch.long),
            train_settings,
            checkpoint_path=checkpoint_path,
            optimizers={"cayley": lambda groups: CayleySGD(groups, iterations=settings.cayley_iterations)},
            on_step=log_step,
        )
    finally:
        delattr(model, ROTATIONS)
        unwrap_weights(model)
        unwrap_quantizers(model)
        for param in model.parameters():
            param.requires_grad_(False)
    if checkpoint_path is not None:
        checkpoint_path.unlink(missing_ok=True)
    metrics = result.metrics()
    metrics["rotation_orthogonality_error"] = rotations.orthogonality_error()
    return rotations, metrics


def fuse(model: nn.Module, rotations: Rotations, online: bool, o_proj_heads: bool) -> dict[str, str]:
    """Fuse the learned R1/R2 exactly as QuaRot fuses its own and (`online`) install the online transforms;
    returns their notes."""
    rotate_model(model, rotations.r1.detach().double(), [r.detach().double() for r in rotations.r2])
    return install_online_transforms(model, cross_heads=o_proj_heads) if online else {}
