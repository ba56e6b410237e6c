"""KV-cache quantization inside attention.

Keys can be quantized after RoPE (on what the cache stores; QuaRot §4) or before RoPE (on `k_proj`'s
output; KVQuant §3.2). Both are per token and head, group-wise (group = head_dim unless smaller),
asymmetric with a clip ratio by default.

Post-RoPE placement uses transformers' attention-function registry: we register `quantbench_sdpa`, which
applies an optional per-head transform to queries and keys (QuaRot's online Hadamard R3; it leaves q·kᵀ
unchanged because the transform is orthogonal), fake-quantizes keys and values, then calls the stock SDPA
attention. The quantized tensors are what attention reads, which equals storing them quantized in the
cache for a single forward (the perplexity protocol); with a generation cache the stored history is
re-quantized each step, which is idempotent for clip_ratio = 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from methods.core.quantizers import fake_quantize_dynamic

ATTN_IMPLEMENTATION = "quantbench_sdpa"


@dataclass(frozen=True)
class KVQuantizer:
    bits: int
    sym: bool = False
    clip_ratio: float = 1.0
    group_size: int | None = None  # None = one group per head (head_dim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_dynamic(x, self.bits, self.sym, self.clip_ratio, self.group_size)


def _quantbench_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    qk_transform: Callable | None = getattr(module, "qb_qk_transform", None)
    if qk_transform is not None:
        query, key = qk_transform(query), qk_transform(key)
    key_quant: KVQuantizer | None = getattr(module, "qb_key_quant", None)
    value_quant: KVQuantizer | None = getattr(module, "qb_value_quant", None)
    if key_quant is not None:
        key = key_quant(key)
    if value_quant is not None:
        value = value_quant(value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _quantbench_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


class _PreRopeKeyQuant(nn.Module):
    """Forward hook target: quantizes k_proj's output per head before RoPE is applied."""

    def __init__(self, quant: KVQuantizer, head_dim: int):
        super().__init__()
        self.quant, self.head_dim = quant, head_dim

    def __call__(self, module, inputs, output):
        shape = output.shape
        return self.quant(output.reshape(*shape[:-1], -1, self.head_dim)).reshape(shape)


def attach_kv_quantization(
    model: nn.Module,
    key_quant: KVQuantizer | None,
    value_quant: KVQuantizer | None,
    pre_rope_keys: bool = False,
) -> None:
    """Quantize the KV cache of every attention block; switches the model to `quantbench_sdpa`."""
    head_dim = (
        model.config.head_dim
        if hasattr(model.config, "head_dim")
        else (model.config.hidden_size // model.config.num_attention_heads)
    )
    for layer in model.model.layers:
        attn = layer.self_attn
        if pre_rope_keys and key_quant is not None:
            attn.k_proj.register_forward_hook(_PreRopeKeyQuant(key_quant, head_dim))
            attn.qb_key_quant = None
        else:
            attn.qb_key_quant = key_quant
        attn.qb_value_quant = value_quant
    use_quantbench_attention(model)


def use_quantbench_attention(model: nn.Module) -> None:
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = ATTN_IMPLEMENTATION
