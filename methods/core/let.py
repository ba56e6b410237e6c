"""Learnable equivalent transformation (LET; OmniQuant, Shao et al., ICLR 2024, §3.3 eq. 3–5; code
`models/transformation.py`, `quantize/utils.py:smooth_and_quant_temporary`) for one Llama-family decoder block.

Channel-wise scales that move activation outliers into the weights, learned with the block's quantizers and, once
trained, folded into the weights so the FP function is unchanged (for Llama, the code learns scales only; its
shifts are for LayerNorm models with biases):
- `qkv`: the attention norm's output divided by s, the columns of q/k/v multiplied by s;
- `fc1`: the MLP norm's output divided by s, the columns of gate/up multiplied by s;
- `out`: the rows of v_proj divided by s, the matching columns of o_proj multiplied by s (with grouped-query
  attention one scale per value channel, repeated over the query heads that read it);
- `qk`: the rows of q_proj divided by s and of k_proj multiplied by s, so q·kᵀ is unchanged.

The starting scales are SmoothQuant's, s = max|X|^α / max|W|^(1−α), with max|X| per input channel over the
calibration windows on the FP model (the code's `generate_act_scale_shift.py`; α its `--alpha`, 0.5) and max|W| per
column of the pair's reference weight as the code takes it (q_proj for `qkv`, up_proj for `fc1`, o_proj for `out`),
clamped at 1e-5; `qk` starts at 1. During training a scale whose
magnitude falls under 1e-2 is held at ±1e-2 with a straight-through gradient (the code's `truncate_number`).

Choices where this differs from the code: with grouped-query attention (SmolLM2: 9 query heads, 3 key/value
heads) `out` has one scale per value channel, started from the largest o_proj input and column over the query heads
that read it (the code sizes it by o_proj's inputs, which only matches v_proj's outputs without GQA); and the `qk`
scales are tied across each RoPE pair (dims d and d + head_dim/2
of a head share one), because RoPE rotates those two coordinates together and only a scale equal on both commutes
with it — with the code's free per-channel scales the folded model is not the trained one.
"""

from __future__ import annotations

import torch
from torch import nn

TRUNCATE = 1e-2
MIN_SCALE = 1e-5
LET_PARAMETERS = r"^let\.s_"  # the trainer's group pattern for the scales (block-relative names)


def _truncated(scale: torch.Tensor) -> torch.Tensor:
    held = torch.where(scale.abs() < TRUNCATE, torch.where(scale < 0, -TRUNCATE, TRUNCATE), scale)
    return scale + (held - scale).detach()


def smoothquant_scale(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max_i |W_ij|^(1−α) over every weight reading channel j (SmoothQuant eq. 4)."""
    weight_max = torch.cat([w.detach().abs() for w in weights], dim=0).amax(dim=0).clamp(min=MIN_SCALE)
    return (act_max.clamp(min=MIN_SCALE).pow(alpha) / weight_max.pow(1 - alpha)).clamp(min=MIN_SCALE)


class ScaledOutput(nn.Module):
    """A norm whose output is divided by a LET scale (= its weight divided by s, for x·w norms)."""

    def __init__(self, norm: nn.Module, scale):
        super().__init__()
        self.norm = norm
        self.scale = scale  # a callable returning the current scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) / self.scale().to(x.dtype)


class LET(nn.Module):
    """The four scale vectors of one block and the weight transforms they induce."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, s_qkv, s_fc1, s_out):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.s_qkv = nn.Parameter(s_qkv.float().clone())
        self.s_fc1 = nn.Parameter(s_fc1.float().clone())
        self.s_out = nn.Parameter(s_out.float().clone())
        self.s_qk = nn.Parameter(torch.ones(kv_heads * head_dim // 2))

    def qkv(self) -> torch.Tensor:
        return _truncated(self.s_qkv)

    def fc1(self) -> torch.Tensor:
        return _truncated(self.s_fc1)

    def out_v(self) -> torch.Tensor:
        return _truncated(self.s_out)

    def out_o(self) -> torch.Tensor:
        """s_out repeated over the query heads of each key/value head: one per o_proj column."""
        per_head = self.out_v().reshape(self.kv_heads, 1, self.head_dim)
        return per_head.expand(-1, self.heads // self.kv_heads, -1).reshape(-1)

    def qk_k(self) -> torch.Tensor:
        """The qk scale per k_proj row: each RoPE pair (d, d + head_dim/2) shares one value."""
        half = _truncated(self.s_qk).reshape(self.kv_heads, self.head_dim // 2)
        return torch.cat([half, half], dim=1).reshape(-1)

    def qk_q(self) -> torch.Tensor:
        per_head = self.qk_k().reshape(self.kv_heads, 1, self.head_dim)
        return per_head.expand(-1, self.heads // self.kv_heads, -1).reshape(-1)

    def transforms(self) -> dict[str, callable]:
        """Block-relative linear name -> weight ↦ transformed weight (rows = outputs, columns = inputs)."""
        return {
            "self_attn.q_proj": lambda w: w * self.qkv()[None, :] / self.qk_q()[:, None],
            "self_attn.k_proj": lambda w: w * self.qkv()[None, :] * self.qk_k()[:, None],
            "self_attn.v_proj": lambda w: w * self.qkv()[None, :] / self.out_v()[:, None],
            "self_attn.o_proj": lambda w: w * self.out_o()[None, :],
            "mlp.gate_proj": lambda w: w * self.fc1()[None, :],
            "mlp.up_proj": lambda w: w * self.fc1()[None, :],
        }


def _channel_max(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()


def record_input_maxima(block: nn.Module, arch) -> tuple[dict[str, torch.Tensor], list]:
    """Hooks recording max|x| per input channel of q_proj, up_proj and o_proj while the block runs; (maxima,
    handles) — remove the handles when done."""
    maxima: dict[str, torch.Tensor] = {}
    attn, mlp = arch.attention(block), arch.mlp(block)

    def hook(name):
        def record(module, args):
            seen = _channel_max(args[0])
            maxima[name] = seen if name not in maxima else torch.maximum(maxima[name], seen)

        return record

    handles = [
        attn.q_proj.register_forward_pre_hook(hook("qkv")),
        attn.o_proj.register_forward_pre_hook(hook("out")),
        mlp.up_proj.register_forward_pre_hook(hook("fc1")),
    ]
    return maxima, handles


def attach_let(block: nn.Module, arch, config, maxima: dict[str, torch.Tensor], alpha: float) -> LET:
    """Build the block's LET from the FP input maxima, wrap its two norms and give its linears the transforms.
    The linears are `TrainableQLinear`s (their `weight_transform` runs before the weight quantizer)."""
    attn, mlp = arch.attention(block), arch.mlp(block)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv_heads
    s_qkv = smoothquant_scale(maxima["qkv"], [attn.q_proj.weight], alpha)
    s_fc1 = smoothquant_scale(maxima["fc1"], [mlp.up_proj.weight], alpha)
    # out: per value channel, the largest input of the o_proj columns it feeds, against those columns' weights
    o_act = maxima["out"].reshape(kv_heads, group, head_dim).amax(dim=1).reshape(-1)
    o_weight = attn.o_proj.weight.detach().abs().amax(dim=0).reshape(kv_heads, group, head_dim).amax(dim=1)
    s_out = (o_act.clamp(min=MIN_SCALE).pow(alpha) / o_weight.reshape(-1).clamp(min=MIN_SCALE).pow(1 - alpha)).clamp(
        min=MIN_SCALE
    )
    let = LET(heads, kv_heads, head_dim, s_qkv, s_fc1, s_out)
    block.let = let
    block.input_layernorm = ScaledOutput(arch.attention_norm(block), let.qkv)
    setattr(block, arch.mlp_norm, ScaledOutput(arch.feedforward_norm(block), let.fc1))
    for name, transform in let.transforms().items():
        parent, attr = arch.block_linears(block)[name]
        getattr(parent, attr).weight_transform = transform
    return let


@torch.no_grad()
def fold_let(block: nn.Module, arch) -> None:
    """Fold the trained scales into the norms and weights and remove the LET: the block computes what it trained."""
    let: LET = block.let
    for name, transform in let.transforms().items():
        parent, attr = arch.block_linears(block)[name]
        linear = getattr(parent, attr)
        linear.weight.data = transform(linear.weight).detach()
        linear.weight_transform = None
    for attr, scale in (("input_layernorm", let.qkv()), (arch.mlp_norm, let.fc1())):
        wrapped: ScaledOutput = getattr(block, attr)
        wrapped.norm.weight.data = wrapped.norm.weight.data / scale.to(wrapped.norm.weight.dtype)
        setattr(block, attr, wrapped.norm)
    del block.let
