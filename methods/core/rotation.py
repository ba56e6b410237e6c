"""Computational-invariance surgery for Llama-family models (QuaRot §3–4, SpinQuant §3).

Convention: an orthogonal transform acts on row vectors, x' = x Tᵀ. For a linear y = x Wᵀ:
* input side  (x' = x Tᵀ):  W' = W Tᵀ     (q/k/v/gate/up/lm_head under R1; down_proj under R4; o_proj under R2/heads)
* output side (y' = y Tᵀ):  W' = T W      (o_proj/down_proj under R1; v_proj under R2)
The residual rotation R1 is x' = x Q (i.e. T = Qᵀ). RMSNorm with unit weight commutes with any orthogonal Q
(‖xQ‖ = ‖x‖), which is why norm weights are folded into the following linears first. All fusions are done in
float64 and cast back, so the rotated FP model equals the original to float32 round-off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from methods.core.arch import arch_of
from methods.core.hadamard import (
    hadamard_transform,
    random_hadamard_matrix,
    random_orthogonal_matrix,
    small_factor,
)


def _apply(linear: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], bias_fn=None) -> None:
    dtype = linear.weight.dtype
    linear.weight.data = fn(linear.weight.data.double()).to(dtype)
    if bias_fn is not None and getattr(linear, "bias", None) is not None:
        linear.bias.data = bias_fn(linear.bias.data.double()).to(dtype)


def fold_norms(model: nn.Module) -> None:
    """RMSNorm(x)·g followed by W equals RMSNorm(x) followed by W·diag(g); then g := 1 (QuaRot §3).

    Only for architectures whose residual stream can be rotated exactly (the arch adapter says so)."""
    arch = arch_of(model)
    if not arch.residual_rotation_exact:
        raise ValueError(f"norm folding for rotation is not exact for the {arch.family} architecture")
    arch.untie_embeddings(model)

    def fold(norm: nn.Module, linears: list[nn.Module]) -> None:
        gain = norm.weight.data.double()
        for linear in linears:
            _apply(linear, lambda w, g=gain: w * g[None, :])
        norm.weight.data = torch.ones_like(norm.weight.data)

    for layer in arch.layers(model):
        readers = arch.residual_readers(layer)
        fold(arch.attention_norm(layer), readers[:3])
        fold(arch.feedforward_norm(layer), readers[3:])
    fold(arch.final_norm(model), [arch.lm_head(model)])


def rotate_residual(model: nn.Module, q: torch.Tensor) -> None:
    """R1: residual stream x ↦ x Q, fused into embeddings, every reader and writer of the stream, lm_head."""
    arch = arch_of(model)
    q = q.double()
    emb = arch.embeddings(model)
    emb.weight.data = (emb.weight.data.double() @ q).to(emb.weight.dtype)
    for layer in tqdm(arch.layers(model), desc="rotate R1", unit="block"):
        for reader in arch.residual_readers(layer):
            _apply(reader, lambda w: w @ q)
        for writer in arch.residual_writers(layer):
            _apply(writer, lambda w: q.T @ w, lambda b: b @ q)
    _apply(arch.lm_head(model), lambda w: w @ q)


def _per_head(w: torch.Tensor, head_dim: int, fn: Callable[[torch.Tensor], torch.Tensor], dim: int) -> torch.Tensor:
    """Apply fn to the head_dim-sized slices of w along `dim` (rows of v_proj or columns of o_proj)."""
    if dim == 0:
        out, inp = w.shape
        return fn(w.T.reshape(inp, out // head_dim, head_dim)).reshape(inp, out).T
    out, inp = w.shape
    return fn(w.reshape(out, inp // head_dim, head_dim)).reshape(out, inp)


def rotate_values(model: nn.Module, transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> None:
    """R2: in layer l every value head v ↦ v R_lᵀ (`transforms[l]`: x ↦ x R_lᵀ, fused into v_proj's rows), and
    o_proj's input heads accordingly, so o_proj's output is unchanged. A Hadamard R2 is marked on the layer's
    attention state (`values_hadamard`), so a KV plug-in does not rotate the values a second time."""
    from methods.core.attention import attention_states

    arch = arch_of(model)
    head_dim = arch.head_dim(model.config)
    transforms = list(transforms)
    hadamard = [isinstance(t, HadamardTransform) for t in transforms]
    if any(hadamard):
        for state, marked in zip(attention_states(model), hadamard, strict=True):
            state.values_hadamard = marked
    for layer, transform in zip(arch.layers(model), transforms, strict=True):
        attn = arch.attention(layer)
        _apply(
            attn.v_proj,
            lambda w, t=transform: _per_head(w, head_dim, t, 0),
            lambda b, t=transform: t(b.reshape(-1, head_dim)).reshape(-1),
        )
        _apply(attn.o_proj, lambda w, t=transform: _per_head(w, head_dim, t, 1))


def rotate_model(
    model: nn.Module,
    r1: torch.Tensor | Callable[[], torch.Tensor],
    r2: Sequence[torch.Tensor | Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> None:
    """Fold norms, untie embeddings, fuse R1 (hidden × hidden, residual x ↦ x R1) and, if given, one R2 per
    layer into v_proj / o_proj. Rotations are values, so QuaRot (random Hadamard), SpinQuant (learned) and
    QuIP/RCP (their own draws) share this fusion: R1 is a matrix or a zero-argument module/function producing
    one (a learned rotation's current value); each R2 is a head_dim × head_dim matrix or a transform
    x ↦ x R2ᵀ applied per head (e.g. `HadamardTransform`, which never builds the matrix)."""
    fold_norms(model)
    rotate_residual(model, r1 if isinstance(r1, torch.Tensor) else r1())
    if r2 is not None:
        rotate_values(model, [_per_head_transform(r) for r in r2])


def _per_head_transform(rotation) -> Callable[[torch.Tensor], torch.Tensor]:
    if not isinstance(rotation, torch.Tensor):
        return rotation
    matrix = rotation.double()
    return lambda x: x @ matrix.T.to(x.dtype)


def fuse_input_transform(linear: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """For an online input transform x ↦ x Tᵀ (applied at run time), fuse W ↦ W Tᵀ so y is unchanged."""
    _apply(linear, transform)


class CrossHeadTransform(nn.Module):
    """QuaRot's online o_proj transform: mixes the heads with H_nh (x ↦ x (H_nh ⊗ I_hd)ᵀ).

    Together with R2 fused into v_proj this makes o_proj's input see H_nh ⊗ H_hd. H_nh is an exact
    Hadamard when one of order nh exists (32, 40 heads); otherwise (SmolLM2's 9 heads) the fixed random
    orthogonal matrix of `hadamard.small_factor` — still exact computational invariance.
    """

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.exact_hadamard = small_factor(num_heads)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = x.reshape(*shape[:-1], self.num_heads, self.head_dim).transpose(-1, -2)
        return hadamard_transform(y).transpose(-1, -2).reshape(shape)


class HadamardTransform(nn.Module):
    """Online x ↦ x Hᵀ over the last dim (QuaRot's R4 before down_proj; R3 on queries and keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x)


def install_online_transforms(model: nn.Module, cross_heads: bool = True) -> dict[str, str]:
    """QuaRot's online transforms on a rotated model (§4): heads mixed by H_nh before o_proj (`cross_heads`),
    R4 = Hadamard before down_proj (each fused into the linear's weight so the function is unchanged), R3 =
    Hadamard on queries and keys after RoPE. Returns notes saying which are exact Hadamards."""
    from methods.core.attention import attention_states
    from methods.core.qlinear import QLinear

    arch = arch_of(model)
    config = model.config
    heads, head_dim = arch.num_heads(config), arch.head_dim(config)
    hadamard = HadamardTransform()
    mixer = CrossHeadTransform(heads, head_dim)
    for layer, state in zip(arch.layers(model), attention_states(model), strict=True):
        attn, mlp = arch.attention(layer), arch.mlp(layer)
        if cross_heads:
            fuse_input_transform(attn.o_proj, mixer)
            attn.o_proj = QLinear.wrap(attn.o_proj, input_transform=mixer)
        fuse_input_transform(mlp.down_proj, hadamard)
        mlp.down_proj = QLinear.wrap(mlp.down_proj, input_transform=hadamard)
        state.qk_transform = hadamard
    notes = {
        "r4_down_proj": f"order {config.intermediate_size}, exact Hadamard={small_factor(config.intermediate_size)[1]}",
        "r3_qk": f"order {head_dim}, exact Hadamard={small_factor(head_dim)[1]}",
    }
    if cross_heads:
        notes["o_proj_heads"] = f"order {heads}, exact Hadamard={mixer.exact_hadamard}"
    return notes


class RotatedQuantizer:
    """x ↦ T⁻¹(Q(T(x))) with a straight-through Q: what a quantizer placed after an orthogonal transform T sees
    and returns, expressed in the unrotated model. SpinQuant learns R1/R2 this way (`methods.spinquant`): for a
    linear reading the residual stream, Q(xR)·(WR)ᵀ = T⁻¹(Q(T x))·Wᵀ with T x = x R, and with Q's error
    detached both forms give the same gradient in R — so the weights need not be re-rotated every step. A plain
    callable, not a module: it stands where plug-ins put their (plain) quantizers."""

    def __init__(self, quantizer: Callable[[torch.Tensor], torch.Tensor], forward, inverse):
        self.quantizer, self.rotate, self.unrotate = quantizer, forward, inverse

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.rotate(x)
        error = (self.quantizer(y.detach()) - y.detach()).detach()
        return self.unrotate(y + error)


def quarot_rotate(model: nn.Module, rotation: str, seed: int, signs_first: bool = True) -> dict[str, str]:
    """QuaRot's rotation (arXiv 2404.00456 §4; `methods.quarot`, and RCP's "rotate" step): R1 (randomized
    Hadamard, or random orthogonal) and R2 = Hadamard per value head fused by the shared `rotate_model`; then
    QuaRot's online transforms: heads mixed before o_proj, R4 before down_proj, R3 on queries and keys. Returns
    notes on which transforms are exact Hadamards."""
    config = model.config
    hidden = config.hidden_size
    if rotation == "hadamard":
        r1 = random_hadamard_matrix(hidden, seed, signs_first=signs_first)
    elif rotation == "random":
        r1 = random_orthogonal_matrix(hidden, seed)
    else:
        raise ValueError(f"rotation must be 'hadamard' or 'random', got {rotation!r}")
    hadamard = HadamardTransform()
    rotate_model(model, r1, [hadamard] * config.num_hidden_layers)
    notes = install_online_transforms(model)
    return {
        "r1": f"{rotation} order {hidden} (dense factor {small_factor(hidden)[0].shape[0]}, "
        f"exact Hadamard={small_factor(hidden)[1]})",
        **notes,
    }


def rotation_refusal(method: str, arch, kv) -> str | None:
    """Why a method that rotates the residual stream (R1) and quantizes keys after its online R3 cannot run on the
    architecture adapter `arch` with the KV plug-in `kv`; None when it can. Read before any model loads."""
    if not arch.residual_rotation_exact:
        return (
            f"{method} does not support the {arch.family} architecture: its norms on sublayer outputs "
            f"({', '.join(arch.output_norms)}) have learned gains, so a residual rotation R1 is not exact"
        )
    if kv is not None and kv.keys_pre_rope:
        return (
            f"{method} quantizes keys after RoPE and its online Hadamard R3 (a pre-RoPE key quantizer would see "
            "unrotated keys): set kv.keys_pre_rope=false"
        )
    return None
