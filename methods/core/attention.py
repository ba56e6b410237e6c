"""Attention-side state of a quantized model, attached in one place: `attention_states(model)`.

Each decoder block's attention module gets one `AttentionState`: an optional transform applied to queries
and keys after RoPE (QuaRot's online Hadamard R3; orthogonal, so q·kᵀ is unchanged), an optional key
quantizer placed after RoPE (on what the cache stores; QuaRot §4) or before it (KVQuant §3.2: on the last
key value before RoPE — k_proj's output for Llama, k_norm's output for Gemma 3, per the arch adapter), and an
optional value quantizer, and an optional observer handed the (query, key) pair attention is about to use
(after RoPE and the qk transform, before the KV quantizers: AKVQ-VL's pivot tokens are chosen from the
attention map it implies). Quantizers see tensors whose last dim is head_dim: pre-RoPE keys as [batch, tokens,
kv_heads, head_dim], post-RoPE keys and values as attention gets them, [batch, kv_heads, tokens, head_dim].

Post-RoPE work happens in `quantbench_sdpa`, registered with transformers' attention-function registry: it
applies the state and calls the stock SDPA attention. The quantized tensors are what attention reads, which
equals storing them quantized in the cache for a single forward (the perplexity protocol); with a generation
cache the stored history is re-quantized each step, idempotent for a grid that contains its own values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from methods.core.arch import arch_of

ATTN_IMPLEMENTATION = "quantbench_sdpa"
STATE_ATTRIBUTE = "quantbench_state"
Transform = Callable[[torch.Tensor], torch.Tensor]
QKObserver = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], None]


@dataclass
class AttentionState:
    qk_transform: Transform | None = None  # queries and keys, after RoPE
    key_quant: Transform | None = None  # keys, at `keys_pre_rope` placement
    value_quant: Transform | None = None
    keys_pre_rope: bool = False
    first_position: int = 0  # the current forward's first token position (cached decoding: > 0)
    observe_qk: QKObserver | None = None  # (module, query, key, attention mask), before the KV quantizers
    values_hadamard: bool = False  # a Hadamard is already fused into v_proj's heads (QuaRot's R2)

    def set_kv(self, key_quant: Transform | None, value_quant: Transform | None, keys_pre_rope: bool) -> None:
        self.key_quant, self.value_quant, self.keys_pre_rope = key_quant, value_quant, keys_pre_rope


def _quantbench_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    state: AttentionState | None = getattr(module, STATE_ATTRIBUTE, None)
    if state is not None:
        if state.qk_transform is not None:
            query, key = state.qk_transform(query), state.qk_transform(key)
        if state.observe_qk is not None:
            state.observe_qk(module, query, key, attention_mask)
        if state.key_quant is not None and not state.keys_pre_rope:
            key = state.key_quant(key)
        if state.value_quant is not None:
            value = state.value_quant(value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _quantbench_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


class _PreRopeKeyHook:
    """Forward hook on the adapter's pre-RoPE key module: applies the state's key quantizer to its output seen as
    [batch, tokens, kv_heads, head_dim] (k_proj's [batch, tokens, channels] or k_norm's [batch, heads, tokens,
    head_dim], per the adapter), so a quantizer sees the same layout on every architecture."""

    def __init__(self, state: AttentionState, head_dim: int, heads_first: bool):
        self.state, self.head_dim, self.heads_first = state, head_dim, heads_first

    def __call__(self, module, inputs, output):
        if self.state.key_quant is None or not self.state.keys_pre_rope:
            return output
        if self.heads_first:
            return self.state.key_quant(output.transpose(1, 2)).transpose(1, 2)
        shape = output.shape
        return self.state.key_quant(output.reshape(*shape[:-1], -1, self.head_dim)).reshape(shape)


class _FirstPositionHook:
    """Forward pre-hook on the attention module: remembers the first position of the tokens it is handed
    (`position_ids`), so pre-RoPE quantizers know whether a forward starts a sequence."""

    def __init__(self, state: AttentionState):
        self.state = state

    def __call__(self, module, args, kwargs):
        position = kwargs.get("position_ids")
        self.state.first_position = int(position.min()) if position is not None and position.numel() else 0


def attention_states(model: nn.Module) -> list[AttentionState]:
    """The per-block states, created (with the pre-RoPE hook) on first use; switches the model to
    `quantbench_sdpa`. Idempotent: later calls return the same objects."""
    arch = arch_of(model)
    head_dim = arch.head_dim(model.config)
    states = []
    for layer in arch.layers(model):
        attn = arch.attention(layer)
        state = getattr(attn, STATE_ATTRIBUTE, None)
        if state is None:
            state = AttentionState()
            setattr(attn, STATE_ATTRIBUTE, state)
            arch.pre_rope_key_module(layer).register_forward_hook(
                _PreRopeKeyHook(state, head_dim, arch.pre_rope_key_heads_first)
            )
            attn.register_forward_pre_hook(_FirstPositionHook(state), with_kwargs=True)
        states.append(state)
    _use_quantbench_attention(model)
    return states


def _use_quantbench_attention(model: nn.Module) -> None:
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = ATTN_IMPLEMENTATION


def uniform_kv_bytes_per_token(model: nn.Module, bits: int, sym: bool, group_size: int | None) -> float:
    """KV-cache bytes per token for a uniform per-(token, head, group) grid: layers · 2 · kv_heads · head_dim
    codes at `bits`, plus an fp16 scale and (asymmetric) an fp16 zero per group; 16-bit: 2 bytes per element."""
    arch = arch_of(model)
    config = model.config
    head_dim = arch.head_dim(config)
    elements = config.num_hidden_layers * 2 * arch.num_kv_heads(config) * head_dim
    if bits >= 16:
        return elements * 2.0
    groups = elements / (group_size or head_dim)
    return elements * bits / 8 + groups * (2 if sym else 4)
