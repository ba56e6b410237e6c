"""KVQuant (Hooper et al., arXiv 2401.18079; code SqueezeAILab/KVQuant): a calibrated KV-cache quantizer that
composes with any weight method (`kv=kvquant`).

* Keys per channel, before RoPE (§3.1–3.2): bounds per channel of k_proj's output (Gemma 3: k_norm's,
  per the arch adapter) fitted offline on the calibration windows; RoPE is applied to the dequantized keys.
  `keys=per_token` / `keys_pre_rope=false` give the ablation's earlier steps.
* Values per token, online (§3.1).
* nuq (§3.3): one table of 2^b levels per layer for keys and one for values, fitted by weighted k-means on
  the normalised calibration activations (outliers and sink tokens left out); the weights are the diagonal
  Fisher information, the squared gradients of the LM loss with respect to the quantized activations
  (k_proj / v_proj outputs) on the calibration windows. `fisher="scaled"` (default) weights each value by
  F·s², s its normalisation half-range — the error the loss sees in the original units (paper App. E);
  `fisher="plain"` weights by F alone, as the authors' code does; `fisher="none"` runs plain k-means.
  `datatype="int"` keeps the uniform grid (the int baseline and the ablation's first steps).
* Dense-and-sparse (§3.4): `outlier_fraction` (1%: "nuq-1%") of the values kept exact — keys: outside
  per-channel thresholds at the (f/2, 1−f/2) quantiles of the calibration keys, as the code computes them;
  values: each token's outer f/2 at each end, found online. Stored as fp16 value + int16 column index per
  outlier and an int32 row pointer per vector (CSR), counted in `bytes_per_token`.
* Attention sink (the authors' `first_few_fp16`, later versions): the first `sink_tokens` tokens of every
  sequence keep fp16 keys and values, and are left out of calibration statistics (the code keeps them in
  the thresholds' percentiles; leaving them out fits the bounds to what is actually quantized).
* Q-Norm (§3.5, proposed for 2 bits): `q_norm=true` shifts and scales each table so the rounded calibration
  values keep their mean and standard deviation.

Calibration uses the harness's calibration windows (`budget=fullppl`: 16 × 2048, the paper's). Simplified:
the calibration runs every window through the whole model at once (a backward pass per window when Fisher
weights are needed), not block by block; activations are recorded at fp32, not fp16. `bytes_per_token` is
measured by encoding the calibration windows (`DenseSparseKV.storage_bits`), fixed tables amortised over
them. With a generation cache, values are re-quantized at every step (the attention-state contract), which
is not idempotent for a non-uniform table; the perplexity protocol is a single forward per window.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from methods.core.attention import AttentionState, attention_states
from methods.core.kvcache import VectorCodec, fit_levels, q_norm, quantiles, uniform_levels
from methods.core.params import flag, valid

log = logging.getLogger(__name__)

KEY_LAYOUTS = ("per_channel", "per_token")
DATATYPES = ("nuq", "int")
FISHER_WEIGHTS = ("scaled", "plain", "none")


@dataclass(frozen=True)
class KVQuantConfig:
    keys: str = valid(
        "per_channel", choices=("per_channel", "per_token")
    )  # per_channel (offline bounds) | per_token (online)
    keys_pre_rope: bool = flag(True)
    datatype: str = valid("nuq", choices=DATATYPES)  # nuq (k-means table) | int (uniform grid)
    outlier_fraction: float = valid(0.01, ge=0, lt=1)  # dense-and-sparse: fraction kept exact; 0 = dense only
    fisher: str = valid(
        "scaled", choices=FISHER_WEIGHTS
    )  # k-means weights: scaled (F·s², paper App. E) | plain (F, authors' code) | none
    sink_tokens: int = valid(1, ge=0)  # first tokens kept in fp16
    q_norm: bool = flag(False)
    kmeans_iters: int = valid(50, ge=1)

    def __post_init__(self):
        for name, value, allowed in (
            ("keys", self.keys, KEY_LAYOUTS),
            ("datatype", self.datatype, DATATYPES),
            ("fisher", self.fisher, FISHER_WEIGHTS),
        ):
            if value not in allowed:
                raise ValueError(f"kv.{name}={value!r} is not one of {', '.join(allowed)}")
        if not 0 <= self.outlier_fraction < 0.5:
            raise ValueError(f"kv.outlier_fraction={self.outlier_fraction} must be in [0, 0.5), e.g. 0.01")
        if self.sink_tokens < 0:
            raise ValueError(f"kv.sink_tokens={self.sink_tokens} must be >= 0")


@dataclass
class _Recorded:
    """One layer's keys or values over the calibration windows, as vectors [windows, tokens, channels]."""

    acts: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)


def _as_vectors(x: torch.Tensor, pre_rope: bool) -> torch.Tensor:
    """[batch, tokens, channels] from the pre-RoPE hook's [batch, tokens, heads, head_dim] or attention's
    [batch, heads, tokens, head_dim]."""
    if pre_rope:
        return x.reshape(x.shape[0], x.shape[1], -1)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _from_vectors(y: torch.Tensor, like: torch.Tensor, pre_rope: bool) -> torch.Tensor:
    if pre_rope:
        return y.reshape(like.shape)
    b, h, s, d = like.shape
    return y.reshape(b, s, h, d).transpose(1, 2)


@dataclass
class _Placed:
    """A codec (or recorder) at its placement: converts the tensor attention hands over to vectors."""

    codec: object
    state: AttentionState
    pre_rope: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        first = self.state.first_position if self.pre_rope else 0
        return _from_vectors(self.codec(_as_vectors(x, self.pre_rope), first), x, self.pre_rope)


@dataclass
class _Recorder:
    record: _Recorded
    with_grad: bool

    def __call__(self, y: torch.Tensor, first_position: int = 0) -> torch.Tensor:
        self.record.acts.append(y.detach().float().reshape(-1, y.shape[-1]))
        if self.with_grad and y.requires_grad:
            y.register_hook(lambda g: self.record.grads.append(g.detach().float().reshape(-1, g.shape[-1])))
        return y


@dataclass
class _Codec:
    """VectorCodec with the sink counted from the sequence's first position (a cached decode step is not
    position 0)."""

    codec: VectorCodec

    def __call__(self, y: torch.Tensor, first_position: int = 0) -> torch.Tensor:
        sink = max(0, self.codec.sink_tokens - first_position)
        if sink == self.codec.sink_tokens:
            return self.codec(y)
        return VectorCodec(**{**self.codec.__dict__, "sink_tokens": sink})(y)


@dataclass
class KVQuantQuantizer:
    bits: int
    config: KVQuantConfig
    needs_calibration: bool = True
    keys: list[VectorCodec] = field(default_factory=list)
    values: list[VectorCodec] = field(default_factory=list)
    bytes_measured: float | None = None
    fit_seconds: dict[str, float] = field(default_factory=dict)
    outlier_fraction_measured: dict[str, float] = field(default_factory=dict)

    @property
    def keys_pre_rope(self) -> bool:
        return self.config.keys_pre_rope

    def fit(self, model: nn.Module, windows) -> None:
        cfg = self.config
        states = attention_states(model)
        need_fisher = cfg.datatype == "nuq" and cfg.fisher != "none"
        records = [(_Recorded(), _Recorded()) for _ in states]
        for state, (k_rec, v_rec) in zip(states, records, strict=True):
            state.set_kv(
                _Placed(_Recorder(k_rec, need_fisher), state, cfg.keys_pre_rope),
                _Placed(_Recorder(v_rec, need_fisher), state, False),
                cfg.keys_pre_rope,
            )
        start = time.perf_counter()
        try:
            _run_calibration(model, windows, need_fisher)
        finally:
            for state in states:
                state.set_kv(None, None, False)
        self.fit_seconds["forward"] = time.perf_counter() - start
        start = time.perf_counter()
        self.keys = [self._fit_one(k_rec, cfg.keys == "per_channel") for k_rec, _ in records]
        self.values = [self._fit_one(v_rec, False) for _, v_rec in records]
        self.fit_seconds["levels"] = time.perf_counter() - start
        self.bytes_measured = self._measure_bytes(records)
        log.info(
            "kvquant: calibrated %d layers (%.0f s forward%s, %.0f s levels), %.1f KV bytes/token",
            len(states),
            self.fit_seconds["forward"],
            " + backward" if need_fisher else "",
            self.fit_seconds["levels"],
            self.bytes_measured,
        )

    def _fit_one(self, record: _Recorded, per_channel: bool) -> VectorCodec:
        cfg = self.config
        seqs = torch.stack(record.acts)  # [windows, tokens, channels]
        body = seqs[:, cfg.sink_tokens :].reshape(-1, seqs.shape[-1])
        codec = VectorCodec(
            self.bits, uniform_levels(self.bits), per_channel, None, None, cfg.outlier_fraction, cfg.sink_tokens
        )
        if per_channel:
            f = cfg.outlier_fraction
            bounds = quantiles(body, [f / 2, 1 - f / 2], dim=0) if f > 0 else None
            codec.lower = bounds[0] if f > 0 else body.min(dim=0).values
            codec.upper = bounds[1] if f > 0 else body.max(dim=0).values
        if cfg.datatype == "int":
            return codec
        center, half, mask, _, _ = codec._parts(body)
        z = (body - center) / torch.where(half > 0, half, torch.ones_like(half))
        keep = ~mask & (z.abs() <= 1)
        weights = None
        if cfg.fisher != "none":
            grads = torch.stack(record.grads) if len(record.grads) == len(record.acts) else torch.zeros_like(seqs)
            fisher = grads.reshape(seqs.shape)[:, cfg.sink_tokens :].reshape(body.shape) ** 2
            if not torch.any(fisher[keep] > 0):
                raise RuntimeError(
                    "kvquant: the Fisher information is zero (activation quantizers block gradients); "
                    "fit with 16-bit activations or set kv.fisher=none"
                )
            weights = fisher * half**2 if cfg.fisher == "scaled" else fisher
            weights = weights[keep].numpy().astype(np.float64)
        codec.levels, _ = fit_levels(z[keep].numpy(), weights, self.bits, cfg.kmeans_iters)
        if cfg.q_norm:
            codec.norm_scale, codec.norm_offset = q_norm(codec.levels, z[keep])
        return codec

    def _measure_bytes(self, records) -> float:
        """Stored bytes per token: each calibration window's keys and values encoded, summed over layers (also
        the fraction of values kept as outliers)."""
        total_bits, outliers, elements = 0, {"keys": 0, "values": 0}, 0
        for key, value, (k_rec, v_rec) in zip(self.keys, self.values, records, strict=True):
            for k, v in zip(k_rec.acts, v_rec.acts, strict=True):
                stored_k, stored_v = key.encode(k), value.encode(v)
                total_bits += stored_k.storage_bits() + stored_v.storage_bits()
                outliers["keys"] += stored_k.vals.numel()
                outliers["values"] += stored_v.vals.numel()
                elements += k.numel()
        self.outlier_fraction_measured = {name: count / elements for name, count in outliers.items()}
        return total_bits / 8 / sum(k.shape[0] for k in records[0][0].acts)

    def metrics(self) -> dict[str, float]:
        """Calibration wall times and the outlier fractions measured on the calibration windows."""
        measured = {f"kvquant_fit_{step}_seconds": seconds for step, seconds in self.fit_seconds.items()}
        return measured | {f"kvquant_outliers_{name}": frac for name, frac in self.outlier_fraction_measured.items()}

    def artifacts(self) -> dict[str, str]:
        """The calibrated quantizers: per layer, the key bounds (per channel) and the K/V level tables."""

        def table(codec: VectorCodec) -> dict:
            bounds = {} if codec.lower is None else {"lower": codec.lower.tolist(), "upper": codec.upper.tolist()}
            return {"levels": codec.table().tolist(), **bounds}

        layers = [{"keys": table(k), "values": table(v)} for k, v in zip(self.keys, self.values, strict=True)]
        return {"kvquant_quantizers.json": json.dumps({"bits": self.bits, "layers": layers})}

    def attach(self, model: nn.Module) -> None:
        if not self.keys:
            raise RuntimeError("kvquant: fit(model, calibration windows) must run before attach")
        for state, key, value in zip(attention_states(model), self.keys, self.values, strict=True):
            state.set_kv(
                _Placed(_Codec(key), state, self.keys_pre_rope),
                _Placed(_Codec(value), state, False),
                self.keys_pre_rope,
            )

    def bytes_per_token(self, model: nn.Module) -> float:
        if self.bytes_measured is None:
            raise RuntimeError("kvquant: bytes per token are measured by fit() on the calibration windows")
        return self.bytes_measured


def _run_calibration(model: nn.Module, windows, need_fisher: bool) -> None:
    """Every calibration window through the model; with Fisher weights, the LM loss's backward pass too
    (parameters frozen: only activation gradients are needed)."""
    if not need_fisher:
        with torch.no_grad():
            for window in windows:
                model(window.reshape(1, -1))
        return
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        embed = model.get_input_embeddings()
        for window in windows:
            ids = window.reshape(1, -1)
            embeds = embed(ids).detach().requires_grad_(True)
            model(inputs_embeds=embeds, labels=ids).loss.backward()
    finally:
        for p, flag in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(flag)


def build(config: KVQuantConfig, bits: int) -> KVQuantQuantizer:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"kvquant stores {bits}-bit codes; use kv2, kv3, kv4 or kv8")
    return KVQuantQuantizer(bits, config)
