"""AKVQ-VL (Su et al., "Attention-Aware KV Cache Adaptive 2-Bit Quantization for Vision-Language Models",
arXiv 2501.15021) as a KV-cache plug-in for text models (`kv=akvq`), RECONSTRUCTED FROM THE PUBLIC DESCRIPTION:
only the abstract and introduction were readable here (the method section of the arXiv HTML did not come back
from search; no authors' code was found), so this follows issue 45's design. Every choice below is an option.

* Walsh–Hadamard transform (WHT, the paper's outlier removal): keys and values are rotated along head_dim by
  the normalised Hadamard matrix H before quantization. A cache would store Q(k Hᵀ), rotate the query by the
  same H ((q Hᵀ)(k Hᵀ)ᵀ = q kᵀ, H orthogonal) and fold H back into the attention output for values; the fake
  quantizer applies H to the dequantized keys and values instead, which gives the same numbers. When the weight
  method already keeps the cache in a Hadamard basis (QuaRot's online R3 on queries and keys, its R2 fused into
  v_proj's heads), a second WHT would undo the first (H·H = I for the Sylvester matrix), so it is skipped there
  and the run's notes say so.
* Codes: dynamic asymmetric round-to-nearest per (token, head, group along head_dim) — `kv=rtn`'s arithmetic;
  `group_size` defaults to head_dim (one group per head, as `kv=rtn`).
* Pivot-Token-Salient Attention (PSA): in the prefill forward, each layer scores every token by the attention
  it receives — the mean over heads and over the forward's queries of the softmax probabilities, computed
  from the (FP) queries and keys attention is about to use — so the scores of a sequence sum to 1. Tokens
  scoring ≥ `pivot_threshold` / N (N = tokens; 1/N is a uniform share) are pivots, the highest first, at
  most ⌊`pivot_fraction` · N⌋ of them, plus the first token when `first_token` (the attention sink); they are
  stored at `pivot_bits` (8; 16 = fp16 in the stored format, left as is by the fake quantizer, as in a kv16
  run). Decode steps of a generation cache reuse the prefill's choice: new tokens are stored at the base
  width, nothing is re-selected.
* Text-Salient Attention (TSA, vision-language only): `text_bits` stores the tokens a modality mask marks as
  text at more bits than image tokens (`set_modality`); text models have no such mask, so the harness refuses
  `kv.text_bits` and it is tested with a synthetic mask.
* Cost: `bytes_per_token` is measured by encoding the calibration windows' keys and values into the stored
  format (`methods.core.mixedkv`: codes, fp16 scales and zeros, int32 positions of the non-base tokens), so
  the comparison with KVQuant's nuq-1% is at true cost.

Open choices (the paper's are not readable): pivots from received attention rather than massive activations;
the threshold (10 × a uniform share), the cap (1 %) and the first token always kept; pivots chosen per layer
(not shared across layers) and per sequence; 8-bit pivots; group = head_dim; keys quantized after RoPE; the
same rule for keys and values.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from methods.core.arch import arch_of
from methods.core.attention import AttentionState, attention_states
from methods.core.hadamard import hadamard_matrix
from methods.core.mixedkv import encode_mixed
from methods.core.params import flag, valid
from methods.core.quantizers import fake_quantize_dynamic

QUERY_CHUNK = 256  # queries per block when scoring received attention (bounds the probability matrix)


@dataclass(frozen=True)
class AKVQConfig:
    wht: bool = flag(True)
    group_size: int | None = valid(None, ge=1, none=True)  # None = head_dim
    pivot_threshold: float = valid(10.0, gt=0)  # pivot if received attention >= threshold / N
    pivot_fraction: float = valid(0.01, ge=0, le=1)  # at most floor(fraction · N) pivots by attention
    first_token: bool = flag(True)  # the first token is always a pivot (attention sink)
    pivot_bits: int = valid(8, choices=(4, 8, 16))
    text_bits: int | None = valid(None, choices=(3, 4, 8, 16), none=True)  # TSA: needs a modality mask


def received_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask) -> torch.Tensor:
    """[batch, key tokens]: the attention each key token receives, averaged over heads and over the forward's
    queries (each query's probabilities sum to 1, so each row sums to 1). query [b, heads, q, d], key
    [b, kv_heads, k, d]; `mask`: attention's mask (bool: True = attend; float: additive) or None = causal with
    the queries at the last positions (then only the causal part of each block of queries is computed)."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    scaling = float(getattr(module, "scaling", head_dim**-0.5))
    softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    queries = (query.float() * scaling).reshape(batch, kv_heads, heads // kv_heads, q_len, head_dim)
    keys = key.float().transpose(-1, -2)[:, :, None]  # [b, kv_heads, 1, d, k]: grouped queries share a key head
    offset = k_len - q_len
    total = torch.zeros(batch, k_len)
    for start in range(0, q_len, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, q_len)
        width = k_len if isinstance(mask, torch.Tensor) else stop + offset
        scores = torch.matmul(queries[:, :, :, start:stop], keys[..., :width])  # [b, kv_heads, groups, c, width]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        if isinstance(mask, torch.Tensor):
            block = mask[..., start:stop, :k_len]
            block = block.reshape(block.shape[0], -1, 1, *block.shape[-2:]) if block.dim() == 4 else block
            scores = scores.masked_fill(~block, float("-inf")) if block.dtype == torch.bool else scores + block
        else:
            diagonal = scores[..., start + offset :]
            later = torch.arange(diagonal.shape[-1])[None, :] > torch.arange(stop - start)[:, None]
            diagonal.masked_fill_(later, float("-inf"))
        scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_().nan_to_num_()
        inverse_sums = scores.sum(dim=-1).reciprocal_().nan_to_num_(posinf=0.0)
        total[:, :width] += torch.einsum("bkgcw,bkgc->bw", scores, inverse_sums)
    return total / (heads * q_len)


def select_pivots(received: torch.Tensor, threshold: float, fraction: float, first_token: bool) -> torch.Tensor:
    """bool [batch, tokens]: tokens with received attention ≥ threshold / N, the highest first, at most
    ⌊fraction · N⌋ of them, plus the first token when `first_token` (not counted in the cap)."""
    batch, tokens = received.shape
    chosen = torch.zeros(batch, tokens, dtype=torch.bool)
    cap = int(fraction * tokens)
    if cap > 0:
        score = received.masked_fill(received * tokens < threshold, float("-inf"))
        if first_token:
            score[:, 0] = float("-inf")
        top = score.topk(min(cap, tokens), dim=-1)
        chosen.scatter_(1, top.indices, top.values > float("-inf"))
    if first_token:
        chosen[:, 0] = True
    return chosen


@dataclass
class _Meter:
    """Calibration measurements: stored bits (keys and values of every layer) and tokens per layer."""

    bits: int = 0
    tokens: int = 0
    pivots: int = 0
    pivot_positions: list[list[int]] = field(default_factory=list)  # per layer, the first window's pivots


@dataclass
class _Modality:
    """The text mask of the current inputs (TSA): bool [batch, tokens], True = text; positions past its end
    (generated tokens) count as text."""

    text: torch.Tensor | None = None


@dataclass
class _LayerCodec:
    """One layer's key and value quantizer and its prefill pivot decision."""

    index: int
    state: AttentionState
    bits: int
    config: AKVQConfig
    rotate_keys: bool
    rotate_values: bool
    modality: _Modality
    meter: _Meter | None = None
    pivots: torch.Tensor | None = None  # bool [batch, prefill tokens]

    def observe(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask) -> None:
        if self.state.first_position != 0:
            return  # a cached decode step: the prefill's pivots stand
        cfg = self.config
        if int(cfg.pivot_fraction * key.shape[2]) == 0 and not cfg.first_token:
            self.pivots = None
            return
        received = received_attention(module, query, key, mask)
        self.pivots = select_pivots(received, cfg.pivot_threshold, cfg.pivot_fraction, cfg.first_token)
        if self.meter is not None:
            self.meter.pivots += int(self.pivots.sum())
            if len(self.meter.pivot_positions) <= self.index:
                self.meter.pivot_positions.append(self.pivots[0].nonzero().flatten().tolist())

    def token_bits(self, batch: int, tokens: int) -> torch.Tensor:
        bits = torch.full((batch, tokens), self.bits, dtype=torch.long)
        text = self.modality.text
        if self.config.text_bits is not None:
            if text is None:
                raise ValueError("kv.text_bits needs a modality mask (set_modality): leave it unset for text models")
            is_text = torch.ones(batch, tokens, dtype=torch.bool)
            known = min(tokens, text.shape[1])
            is_text[:, :known] = text[:, :known]
            bits[is_text] = max(self.bits, self.config.text_bits)
        if self.pivots is not None:
            known = min(tokens, self.pivots.shape[1])
            head = bits[:, :known]
            head[self.pivots[:, :known]] = torch.clamp(head[self.pivots[:, :known]], min=self.config.pivot_bits)
        return bits

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantize(x, self.rotate_keys)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantize(x, self.rotate_values)

    def _quantize(self, x: torch.Tensor, rotate: bool) -> torch.Tensor:
        """x [batch, kv_heads, tokens, head_dim] (post-RoPE keys or values, as attention gets them)."""
        dtype, head_dim = x.dtype, x.shape[-1]
        group = self.config.group_size or head_dim
        y = x.float()
        if rotate:
            y = y @ _hadamard(head_dim).T
        token_bits = self.token_bits(x.shape[0], x.shape[2])
        out = torch.empty_like(y)
        for bits in token_bits.unique().tolist():
            chosen = (token_bits == bits)[:, None, :, None]
            quantized = fake_quantize_dynamic(y, bits, False, 1.0, group)  # 16 bits: as is, as kv16 runs
            out = torch.where(chosen, quantized, out)
        if self.meter is not None:
            for row, row_bits in zip(y.transpose(1, 2), token_bits, strict=True):
                self.meter.bits += encode_mixed(row, row_bits, self.bits, group, False).storage_bits()
        if rotate:
            out = out @ _hadamard(head_dim)
        return out.to(dtype)


@functools.lru_cache(maxsize=8)
def _hadamard(n: int) -> torch.Tensor:
    """The orthonormal Hadamard matrix of order n (Sylvester's for a power of two), float32, built once."""
    return hadamard_matrix(n).float()


@dataclass
class AKVQQuantizer:
    bits: int
    config: AKVQConfig
    needs_calibration: bool = True  # no statistics are fitted: the calibration windows measure the true cost
    keys_pre_rope: bool = False
    layers: list[_LayerCodec] = field(default_factory=list)
    modality: _Modality = field(default_factory=_Modality)
    bytes_measured: float | None = None
    pivots_per_token: float | None = None
    pivot_positions: list[list[int]] = field(default_factory=list)
    rotation_notes: dict[str, str] = field(default_factory=dict)

    def set_modality(self, text: torch.Tensor | None) -> None:
        """TSA: bool [batch, tokens], True where the input token is text (None clears it)."""
        self.modality.text = None if text is None else text.bool()

    def _build_layers(self, model: nn.Module) -> None:
        states = attention_states(model)
        head_dim = arch_of(model).head_dim(model.config)
        group = self.config.group_size or head_dim
        if head_dim % group:
            raise ValueError(f"kv.group_size={group} must divide head_dim={head_dim}")
        keys_rotated = [s.qk_transform is not None for s in states]
        values_rotated = [s.values_hadamard for s in states]
        self.rotation_notes = {
            "akvq_wht_keys": _wht_note(self.config.wht, keys_rotated, "QuaRot's online R3 on queries and keys"),
            "akvq_wht_values": _wht_note(self.config.wht, values_rotated, "a Hadamard R2 fused into v_proj"),
        }
        self.layers = [
            _LayerCodec(
                i, state, self.bits, self.config, self.config.wht and not k, self.config.wht and not v, self.modality
            )
            for i, (state, k, v) in enumerate(zip(states, keys_rotated, values_rotated, strict=True))
        ]

    def fit(self, model: nn.Module, windows) -> None:
        """Nothing is fitted (the quantizer is dynamic): the calibration windows run through the model with the
        quantizer attached to measure the stored bytes per token and the pivots chosen."""
        self.attach(model)
        meter = _Meter()
        for layer in self.layers:
            layer.meter = meter
        try:
            with torch.no_grad():
                for window in windows:
                    model(window.reshape(1, -1))
                    meter.tokens += window.numel()
        finally:
            for layer in self.layers:
                layer.meter = None
        self.bytes_measured = meter.bits / 8 / meter.tokens
        self.pivots_per_token = meter.pivots / meter.tokens / len(self.layers)
        self.pivot_positions = meter.pivot_positions

    def attach(self, model: nn.Module) -> None:
        if not self.layers:
            self._build_layers(model)
        for layer in self.layers:
            layer.state.set_kv(layer.keys, layer.values, False)
            layer.state.observe_qk = layer.observe

    def bytes_per_token(self, model: nn.Module) -> float:
        if self.bytes_measured is None:
            raise RuntimeError("akvq: bytes per token are measured by fit() on the calibration windows")
        return self.bytes_measured

    def notes(self) -> dict[str, str]:
        """Where the WHT ran (skipped on a cache the weight method already keeps in a Hadamard basis)."""
        return dict(self.rotation_notes)

    def metrics(self) -> dict[str, float]:
        return {} if self.pivots_per_token is None else {"akvq_pivot_fraction": self.pivots_per_token}

    def artifacts(self) -> dict[str, str]:
        """Per layer, the pivot positions chosen in the first calibration window."""
        return {"akvq_pivots.json": json.dumps({"first_window_pivots": self.pivot_positions})}


def _wht_note(enabled: bool, already: list[bool], what: str) -> str:
    if not enabled:
        return "off (kv.wht=false)"
    if all(already):
        return f"skipped: the cache is already in a Hadamard basis ({what})"
    return "applied" if not any(already) else f"applied where {what} is absent"


def build(config: AKVQConfig, bits: int) -> AKVQQuantizer:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"akvq stores {bits}-bit codes; use kv2, kv3, kv4 or kv8")
    if config.text_bits is not None:
        raise ValueError(
            "kv.text_bits allocates bits by modality (AKVQ-VL's text-salient attention) and needs a vision-language "
            "input's modality mask; the harness evaluates text models: leave kv.text_bits unset"
        )
    return AKVQQuantizer(bits, config)
