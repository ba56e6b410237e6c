"""QuaRot (Ashkboos et al., 2024, arXiv 2404.00456): rotations that remove outliers, then W/A/KV quantization.

Pipeline (paper §4, Fig. 3–4):
1. fold RMSNorm weights into the next linears, untie embeddings (§3 "computational invariance");
2. R1: randomized Hadamard Q = diag(s)·H on the residual stream (random signs first, as the authors' code),
   fused into embeddings, all linears and lm_head;
3. R2: Hadamard per value head, fused into v_proj and o_proj; online Hadamard across heads before o_proj,
   so o_proj's input sees H_nh ⊗ H_hd (for SmolLM2's 9 heads no order-9 Hadamard exists: a fixed random
   orthogonal 9×9 block is used instead — still exact invariance, see `hadamard.small_factor`);
4. R4: online Hadamard before down_proj, its inverse fused into down_proj (order 1536 = 12·128 exact);
5. R3: online Hadamard on queries and keys after RoPE, so the quantized keys are rotated (§4.3);
6. weights by GPTQ (default; the authors' settings: no act-order, damp 0.01, fp32 solve; `true_sequential`
   is their code's order, an option here) or RTN — symmetric per channel (or group g), max|w| / (2^(b-1) - 1),
   clip searched by MSE (`w_clip`);
   activations per-token symmetric, clip 0.9, at every decoder linear's input (after its online transform);
   KV cache asymmetric, group = head_dim, clip 0.95 (§5 settings) — the `act=rtn` / `kv=rtn` plug-ins with
   QuaRot's clip ratios from `conf/{act,kv}_recipe/quarot-rtn.yaml`. Embeddings and lm_head stay 16-bit.
The rotated FP model equals the original to float32 round-off (tests check logits and PPL).

Refused before loading: architectures whose residual stream cannot be rotated exactly (Gemma 3: its
post-attention / post-feed-forward RMSNorms with learned gains sit on the sublayer outputs, so R1 would change
the function), and a KV quantizer placing keys before RoPE (QuaRot quantizes keys after its online R3).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.base import QuantContext, QuantSummary, Request, UnsupportedBits
from methods.core.bits import BitSpec, check_integer_weight_bits
from methods.core.gptq import GPTQSettings, quantize_rotated_weights
from methods.core.params import Valid, added_later, flag, valid
from methods.core.quantizers import SYM_GRIDS
from methods.core.rotation import quarot_rotate, rotation_refusal


@dataclass(frozen=True)
class QuaRotConfig(GPTQSettings):
    """The rotation, the weight quantizer (GPTQ's solver settings, or RTN) and QuaRot's §5 weight grid."""

    rotation: str = valid(
        "hadamard", choices=("hadamard", "random")
    )  # "hadamard" (randomized Hadamard, the paper's) or "random" (orthogonal)
    weights: str = valid("gptq", choices=("gptq", "rtn"))  # "gptq" or "rtn"
    w_sym: bool = flag(True)
    w_mse_clip: bool = flag(True)
    act_order: bool = flag(False)  # the authors' fake_quant default (--act_order off); GPTQ's own default is on
    w_sym_grid: str = added_later(
        "absmax", legacy="absmax", valid=Valid(choices=SYM_GRIDS)
    )  # the authors' symmetric grid: max|w| / (2^(b-1) - 1)
    # diag(s)·H (the authors': random signs before the Hadamard); false = H·diag(s), which this harness used
    # before and which leaves |x Q| independent of the seed (kept to re-create rows recorded with it)
    signs_first: bool = added_later(True, legacy=False, valid=Valid(choices=(False, True)))


def supports(request: Request) -> None:
    check_integer_weight_bits(request.bits, "quarot", UnsupportedBits)
    refusal = rotation_refusal("quarot", request.arch, request.kv)
    if refusal:
        raise UnsupportedBits(refusal)


def quantize(model: nn.Module, cfg: QuaRotConfig, bits: BitSpec, ctx: QuantContext) -> QuantSummary:
    if cfg.weights not in ("gptq", "rtn"):
        raise ValueError(f"quarot weights must be 'gptq' or 'rtn', got {cfg.weights!r}")
    summary = QuantSummary(notes=quarot_rotate(model, cfg.rotation, ctx.seed, cfg.signs_first))
    summary.metrics.update(quantize_rotated_weights(model, bits, cfg, ctx.calibration))
    return summary
