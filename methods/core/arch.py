"""The one place that knows where things live in a decoder-only transformer, per model family.

Every primitive (calibration capture, rotations, KV hooks, memory, latency) asks an `ArchAdapter` for the
decoder blocks, their linears, norms, embeddings, lm_head and attention geometry; nothing else spells
`model.model.layers` or `self_attn.q_proj`.

Families:
* `llama` — Llama-2/3, SmolLM2, Mistral, Qwen2: pre-norm blocks (input_layernorm → attention,
  post_attention_layernorm → MLP), RoPE applied to k_proj's output.
* `gemma3` — Gemma 3 text models: the same linears, plus *sandwich* norms (post_attention_layernorm and
  post_feedforward_layernorm normalise each sublayer's output before it joins the residual stream;
  pre_feedforward_layernorm feeds the MLP), per-head q_norm/k_norm before RoPE (so the pre-RoPE key point is
  k_norm's output), head_dim 256, sliding-window and full-attention layers with different masks and RoPE
  tables, embeddings scaled by √hidden. A residual-stream rotation (QuaRot/SpinQuant R1) is not exact here:
  an RMSNorm with learned gains on a sublayer's output does not commute with a rotation of that output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


class UnsupportedArchitecture(ValueError):
    """The model's family has no adapter; the message lists the supported ones."""


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    model_types: tuple[str, ...]  # transformers `config.model_type` values of this family
    mlp_norm: str  # the norm whose output the MLP reads
    output_norms: tuple[str, ...]  # norms applied to sublayer outputs before the residual add (Gemma 3)
    pre_rope_key: str  # the attention submodule whose output is the last key value before RoPE
    pre_rope_key_heads_first: (
        bool  # its output is [batch, heads, tokens, head_dim] (else [batch, tokens, heads·head_dim])
    )
    residual_rotation_exact: bool  # can an orthogonal R1 be fused with the function unchanged?

    # --- where things are ------------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def embeddings(self, model: nn.Module) -> nn.Module:
        return model.model.embed_tokens

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def body(self, model: nn.Module) -> nn.Module:
        """The decoder stack with its final norm: input ids -> last hidden states (before lm_head)."""
        return model.model

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head on (a chunk of) final hidden states, with the family's logit soft-capping if it has one."""
        logits = self.lm_head(model)(hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def attention_norm(self, layer: nn.Module) -> nn.Module:
        return layer.input_layernorm

    def feedforward_norm(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_norm)

    def pre_rope_key_module(self, layer: nn.Module) -> nn.Module:
        return getattr(self.attention(layer), self.pre_rope_key)

    # --- the linears of a block -------------------------------------------------------------------------
    def block_linears(self, layer: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        """'self_attn.q_proj' -> (parent module, attribute) for every linear in one decoder block."""
        found = {}
        for parent_name, parent, attrs in (
            ("self_attn", self.attention(layer), ATTENTION_LINEARS),
            ("mlp", self.mlp(layer), MLP_LINEARS),
        ):
            for attr in attrs:
                if isinstance(getattr(parent, attr, None), nn.Module):
                    found[f"{parent_name}.{attr}"] = (parent, attr)
        return found

    def decoder_linears(self, model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
        """(qualified name, parent, attribute, module) for every linear inside decoder blocks. Embeddings and
        lm_head are not decoder linears: they stay 16-bit, as in GPTQ/QuaRot/SpinQuant."""
        for index, layer in enumerate(self.layers(model)):
            for name, (parent, attr) in self.block_linears(layer).items():
                yield f"model.layers.{index}.{name}", parent, attr, getattr(parent, attr)

    @staticmethod
    def shared_input_groups() -> tuple[tuple[str, ...], ...]:
        """Linears that read the same tensor (one Hessian serves each group; the first name owns it)."""
        return (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))

    def residual_readers(self, layer: nn.Module) -> list[nn.Module]:
        attn, mlp = self.attention(layer), self.mlp(layer)
        return [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]

    def residual_writers(self, layer: nn.Module) -> list[nn.Module]:
        return [self.attention(layer).o_proj, self.mlp(layer).down_proj]

    # --- geometry ---------------------------------------------------------------------------------------
    @staticmethod
    def head_dim(config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @staticmethod
    def num_heads(config) -> int:
        return config.num_attention_heads

    @staticmethod
    def num_kv_heads(config) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    # --- embeddings -------------------------------------------------------------------------------------
    def tied_embeddings(self, model: nn.Module) -> bool:
        return self.lm_head(model).weight is self.embeddings(model).weight

    def untie_embeddings(self, model: nn.Module) -> None:
        """Give lm_head its own weight (a rotation or fold changes the two differently)."""
        head, emb = self.lm_head(model), self.embeddings(model)
        if head.weight is emb.weight:
            head.weight = nn.Parameter(emb.weight.data.clone())
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = None


LLAMA = ArchAdapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2"),
    mlp_norm="post_attention_layernorm",
    output_norms=(),
    pre_rope_key="k_proj",
    pre_rope_key_heads_first=False,
    residual_rotation_exact=True,
)
GEMMA3 = ArchAdapter(
    family="gemma3",
    model_types=("gemma3_text", "gemma3"),
    mlp_norm="pre_feedforward_layernorm",
    output_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    pre_rope_key="k_norm",
    pre_rope_key_heads_first=True,
    residual_rotation_exact=False,
)
ARCHS = {adapter.family: adapter for adapter in (LLAMA, GEMMA3)}


def arch_for_model_type(model_type: str) -> ArchAdapter:
    for adapter in ARCHS.values():
        if model_type in adapter.model_types:
            return adapter
    known = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ARCHS.values())
    raise UnsupportedArchitecture(f"no architecture adapter for model_type {model_type!r}; supported: {known}")


def arch_of(model: nn.Module) -> ArchAdapter:
    return arch_for_model_type(model.config.model_type)


def decoder_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """`ArchAdapter.decoder_linears` of the model's own family."""
    return arch_of(model).decoder_linears(model)
