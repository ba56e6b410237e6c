"""QuaRot (Ashkboos et al., 2024, arXiv 2404.00456): rotations that remove outliers, then W/A/KV quantization.

Pipeline (paper §4, Fig. 3–4):
1. fold RMSNorm weights into the next linears, untie embeddings (§3 "computational invariance");
2. R1: randomized Hadamard on the residual stream, fused into embeddings, all linears and lm_head;
3. R2: Hadamard per value head, fused into v_proj and o_proj; online Hadamard across heads before o_proj,
   so o_proj's input sees H_nh ⊗ H_hd (for SmolLM2's 9 heads no order-9 Hadamard exists: a fixed random
   orthogonal 9×9 block is used instead — still exact invariance, see `hadamard.small_factor`);
4. R4: online Hadamard before down_proj, its inverse fused into down_proj (order 1536 = 12·128 exact);
5. R3: online Hadamard on queries and keys after RoPE, so the quantized keys are rotated (§4.3);
6. weights by GPTQ (default) or RTN — symmetric per channel (or group g), clip searched by MSE (`w_clip`);
   activations per-token symmetric, clip 0.9, at every decoder linear's input (after its online transform);
   KV cache asymmetric, group = head_dim, clip 0.95 (§5 settings). Embeddings and lm_head stay 16-bit.
The rotated FP model equals the original to float32 round-off (tests check logits and PPL).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from harness.spec import BitSpec
from methods.base import QuantContext, QuantSummary
from methods.core.arch import arch_of
from methods.core.attention import attention_states
from methods.core.hadamard import random_hadamard_matrix, random_orthogonal_matrix, small_factor
from methods.core.qlinear import QLinear
from methods.core.rotation import (
    CrossHeadTransform,
    HadamardTransform,
    fold_norms,
    fuse_input_transform,
    rotate_residual,
    rotate_values,
)
from methods.gptq import GPTQConfig, quantize_weights, weight_quantizer
from methods.rtn import attach_act_and_kv, check_integer_bits, quantize_weights_rtn


@dataclass(frozen=True)
class QuaRotConfig(GPTQConfig):
    """GPTQ's solver settings plus the rotation; defaults differ where QuaRot's §5 differs from GPTQ's."""

    rotation: str = "hadamard"  # "hadamard" (randomized Hadamard, the paper's) or "random" (orthogonal)
    weights: str = "gptq"  # "gptq" or "rtn"
    w_sym: bool = True
    w_mse_clip: bool = True
    a_clip_ratio: float = 0.9
    kv_clip_ratio: float = 0.95


def supports(bits: BitSpec) -> None:
    check_integer_bits(bits, "quarot")


def rotate_model(model: nn.Module, rotation: str, seed: int) -> dict[str, str]:
    """Apply R1–R4 (and the cross-head transform); returns notes on which transforms are exact Hadamards."""
    config = model.config
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    fold_norms(model)
    if rotation == "hadamard":
        q = random_hadamard_matrix(hidden, seed)
    elif rotation == "random":
        q = random_orthogonal_matrix(hidden, seed)
    else:
        raise ValueError(f"quarot rotation must be 'hadamard' or 'random', got {rotation!r}")
    rotate_residual(model, q)
    hadamard = HadamardTransform()
    rotate_values(model, head_dim, hadamard)
    cross_heads = CrossHeadTransform(heads, head_dim)
    arch = arch_of(model)
    for layer, state in zip(arch.layers(model), attention_states(model), strict=True):
        attn, mlp = arch.attention(layer), arch.mlp(layer)
        fuse_input_transform(attn.o_proj, cross_heads)
        attn.o_proj = QLinear.wrap(attn.o_proj, input_transform=cross_heads)
        fuse_input_transform(mlp.down_proj, hadamard)
        mlp.down_proj = QLinear.wrap(mlp.down_proj, input_transform=hadamard)
        state.qk_transform = hadamard
    return {
        "r1": f"{rotation} order {hidden} (dense factor {small_factor(hidden)[0].shape[0]}, "
        f"exact Hadamard={small_factor(hidden)[1]})",
        "r4_down_proj": f"order {config.intermediate_size}, exact Hadamard={small_factor(config.intermediate_size)[1]}",
        "o_proj_heads": f"order {heads}, exact Hadamard={cross_heads.exact_hadamard}",
        "r3_qk": f"order {head_dim}, exact Hadamard={small_factor(head_dim)[1]}",
    }


def quantize(model: nn.Module, cfg: QuaRotConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    if cfg.weights not in ("gptq", "rtn"):
        raise ValueError(f"quarot weights must be 'gptq' or 'rtn', got {cfg.weights!r}")
    summary = QuantSummary(notes=rotate_model(model, cfg.rotation, ctx.seed))
    if bits.quantizes_weights:
        if cfg.weights == "gptq":
            summary.metrics.update(quantize_weights(model, cfg, bits, ctx))
        else:
            quantize_weights_rtn(model, weight_quantizer(cfg, bits))
    attach_act_and_kv(model, bits, cfg)
    return summary
