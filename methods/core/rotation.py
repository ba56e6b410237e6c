"""Computational-invariance surgery for Llama-family models (QuaRot §3–4, SpinQuant §3).

Convention: an orthogonal transform acts on row vectors, x' = x Tᵀ. For a linear y = x Wᵀ:
* input side  (x' = x Tᵀ):  W' = W Tᵀ     (q/k/v/gate/up/lm_head under R1; down_proj under R4; o_proj under R2/heads)
* output side (y' = y Tᵀ):  W' = T W      (o_proj/down_proj under R1; v_proj under R2)
The residual rotation R1 is x' = x Q (i.e. T = Qᵀ). RMSNorm with unit weight commutes with any orthogonal Q
(‖xQ‖ = ‖x‖), which is why norm weights are folded into the following linears first. All fusions are done in
float64 and cast back, so the rotated FP model equals the original to float32 round-off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from methods.core.hadamard import hadamard_transform, small_factor


def _apply(linear: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], bias_fn=None) -> None:
    dtype = linear.weight.dtype
    linear.weight.data = fn(linear.weight.data.double()).to(dtype)
    if bias_fn is not None and getattr(linear, "bias", None) is not None:
        linear.bias.data = bias_fn(linear.bias.data.double()).to(dtype)


def untie_embeddings(model: nn.Module) -> None:
    """Give lm_head its own weight (a rotation/fold changes the two differently)."""
    if model.lm_head.weight is model.model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.data.clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None


def fold_norms(model: nn.Module) -> None:
    """RMSNorm(x)·g followed by W equals RMSNorm(x) followed by W·diag(g); then g := 1 (QuaRot §3)."""
    untie_embeddings(model)

    def fold(norm: nn.Module, linears: list[nn.Module]) -> None:
        gain = norm.weight.data.double()
        for linear in linears:
            _apply(linear, lambda w, g=gain: w * g[None, :])
        norm.weight.data = torch.ones_like(norm.weight.data)

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    fold(model.model.norm, [model.lm_head])


def rotate_residual(model: nn.Module, q: torch.Tensor) -> None:
    """R1: residual stream x ↦ x Q, fused into embeddings, every reader and writer of the stream, lm_head."""
    q = q.double()
    emb = model.model.embed_tokens
    emb.weight.data = (emb.weight.data.double() @ q).to(emb.weight.dtype)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _apply(reader, lambda w: w @ q)
        for writer in (attn.o_proj, mlp.down_proj):
            _apply(writer, lambda w: q.T @ w, lambda b: b @ q)
    _apply(model.lm_head, lambda w: w @ q)


def _per_head(w: torch.Tensor, head_dim: int, fn: Callable[[torch.Tensor], torch.Tensor], dim: int) -> torch.Tensor:
    """Apply fn to the head_dim-sized slices of w along `dim` (rows of v_proj or columns of o_proj)."""
    if dim == 0:
        out, inp = w.shape
        return fn(w.T.reshape(inp, out // head_dim, head_dim)).reshape(inp, out).T
    out, inp = w.shape
    return fn(w.reshape(out, inp // head_dim, head_dim)).reshape(out, inp)


def rotate_values(model: nn.Module, head_dim: int, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """R2: every value head v ↦ v Hᵀ (fused into v_proj's rows) and o_proj's input heads accordingly."""
    for layer in model.model.layers:
        attn = layer.self_attn
        _apply(
            attn.v_proj,
            lambda w: _per_head(w, head_dim, transform, 0),
            lambda b: transform(b.reshape(-1, head_dim)).reshape(-1),
        )
        _apply(attn.o_proj, lambda w: _per_head(w, head_dim, transform, 1))


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
