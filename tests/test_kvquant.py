"""KVQuant (methods/kv/kvquant.py) and its dense-and-sparse KV format (methods/core/kvcache.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from harness.models import tiny_llama
from methods.core.attention import attention_states
from methods.core.kvcache import VectorCodec, fit_levels, packed_nbytes, q_norm, uniform_levels
from methods.kv.kvquant import KVQuantConfig, _Recorded, build


def _heavy_tailed(rows: int, channels: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, channels, generator=g) * torch.linspace(0.2, 3.0, channels)
    y[:, 3] *= 8  # an outlier channel, as keys have
    return y + torch.distributions.StudentT(3.0).sample((rows, channels)) * 0.1


def test_weighted_kmeans_matches_scikit_learn_from_the_same_start():
    values = np.random.default_rng(0).standard_t(4, 500).astype(np.float64)
    weights = np.random.default_rng(1).random(500)
    levels, inertia = fit_levels(values, weights, bits=2, max_iter=50, seed=0)
    oracle = KMeans(n_clusters=4, random_state=0, n_init="auto", max_iter=50).fit(
        values.reshape(-1, 1), sample_weight=weights
    )
    assert torch.allclose(levels, torch.from_numpy(np.sort(oracle.cluster_centers_.ravel())).float())
    assert inertia == pytest.approx(oracle.inertia_, rel=1e-6)
    nearest = levels.double().numpy()[np.abs(values[:, None] - levels.numpy()).argmin(1)]
    objective = float((weights * (values - nearest) ** 2).sum())  # the weighted objective, recomputed
    assert objective == pytest.approx(inertia, rel=1e-6)


@pytest.mark.parametrize("fisher", ["scaled", "plain"])
def test_key_levels_are_fisher_weighted_kmeans_of_the_normalised_inliers(fisher):
    """The calibration's k-means input, built by hand: per-channel bounds at the 0.5/99.5% quantiles, values
    normalised to [-1, 1], outliers and sink tokens left out, weights F·s² (paper) or F (code)."""
    acts = [_heavy_tailed(40, 16, seed) for seed in range(3)]
    grads = [torch.randn(40, 16, generator=torch.Generator().manual_seed(10 + s)) for s in range(3)]
    config = KVQuantConfig(fisher=fisher, outlier_fraction=0.02, sink_tokens=2)
    codec = build(config, 3)._fit_one(_Recorded(acts, grads), per_channel=True)

    body = torch.stack(acts)[:, 2:].reshape(-1, 16)
    fisher_info = (torch.stack(grads)[:, 2:].reshape(-1, 16)) ** 2
    lower, upper = torch.quantile(body, torch.tensor([0.01, 0.99]), dim=0)
    assert torch.equal(codec.lower, lower) and torch.equal(codec.upper, upper)
    lower, upper = lower.half().float(), upper.half().float()
    center, half = ((upper + lower) / 2).half().float(), ((upper - lower) / 2).half().float()
    z = (body - center) / half
    keep = (body >= lower) & (body <= upper) & (z.abs() <= 1)
    weights = fisher_info * half**2 if fisher == "scaled" else fisher_info
    oracle = KMeans(n_clusters=8, random_state=0, n_init="auto", max_iter=50)
    oracle.fit(z[keep].numpy().reshape(-1, 1), sample_weight=weights[keep].double().numpy())
    assert torch.allclose(codec.levels, torch.from_numpy(np.sort(oracle.cluster_centers_.ravel())).float(), atol=1e-6)


def test_uniform_levels_are_asymmetric_round_to_nearest():
    y = _heavy_tailed(8, 32)
    codec = VectorCodec(3, uniform_levels(3), per_channel=False)
    lo, hi = y.min(-1, keepdim=True).values, y.max(-1, keepdim=True).values
    center, half = ((hi + lo) / 2).half().float(), ((hi - lo) / 2).half().float()
    codes = torch.clamp(torch.round((y - (center - half)) / (2 * half / 7)), 0, 7)  # integer RTN
    expected = center + half * (-1 + 2 * codes / 7).half().float()  # its levels as stored (fp16)
    assert torch.allclose(codec(y.unsqueeze(0))[0], expected, atol=1e-5)
    assert codec(y.unsqueeze(0)).unique().numel() <= 8 * 8


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_encode_decodes_to_the_fake_quantizer_and_counts_its_packed_bytes(per_channel, bits):
    y = _heavy_tailed(50, 24)
    lower, upper = torch.quantile(y, torch.tensor([0.02, 0.98]), dim=0)
    levels = torch.sort(torch.rand(2**bits, generator=torch.Generator().manual_seed(bits)) * 2 - 1).values
    codec = VectorCodec(
        bits, levels, per_channel, lower, upper, outlier_fraction=0.04, sink_tokens=1, norm_scale=1.1, norm_offset=0.02
    )
    stored = codec.encode(y)
    assert torch.equal(stored.dequantize(), codec(y.unsqueeze(0))[0])
    assert stored.vals.numel() > 0 and torch.equal(stored.sink, y[:1].half().float())
    assert stored.storage_bits() == 8 * packed_nbytes(stored.pack())
    outliers = stored.row_ptr.diff()
    assert int(outliers.sum()) == stored.vals.numel() and (per_channel or bool((outliers >= 2).all()))


def test_the_sink_is_counted_from_the_sequence_start():
    from methods.kv.kvquant import _Codec

    y = _heavy_tailed(6, 16).unsqueeze(0)
    codec = VectorCodec(2, uniform_levels(2), per_channel=False, sink_tokens=2)
    assert torch.equal(_Codec(codec)(y, 0)[0, :2], y[0, :2].half().float())
    decode_step = _Codec(codec)(y[:, 5:], 5)  # a cached decode step at position 5: no sink left
    assert torch.equal(decode_step, VectorCodec(2, uniform_levels(2), per_channel=False)(y[:, 5:]))


def test_q_norm_keeps_the_calibration_mean_and_deviation():
    z = torch.tanh(torch.randn(4000, generator=torch.Generator().manual_seed(0)))
    levels = torch.tensor([-0.9, -0.2, 0.1, 0.8])
    scale, offset = q_norm(levels, z)
    idx = torch.bucketize(z, (levels[1:] + levels[:-1]) / 2)
    rounded = (levels * scale + offset)[idx]
    assert rounded.mean() == pytest.approx(float(z.mean()), abs=1e-5)
    assert rounded.std(unbiased=False) == pytest.approx(float(z.std(unbiased=False)), rel=1e-5)


def _windows(vocab: int, n: int = 4, length: int = 48):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(n)]


def test_pre_rope_keys_attention_reads_rope_of_the_dequantized_keys():
    """Hand-built reference for layer 0: RoPE(dequant(quant(k_proj(norm(x))))) is the key attention reads."""
    model, _ = tiny_llama(seed=0)
    model.eval()
    quantizer = build(KVQuantConfig(datatype="int", outlier_fraction=0.0, sink_tokens=0), 2)
    quantizer.fit(model, _windows(model.config.vocab_size))
    quantizer.attach(model)
    seen = []
    state = attention_states(model)[0]
    state.qk_transform = lambda t: seen.append(t) or t  # called on queries, then keys
    ids = torch.arange(40).reshape(1, 40) % model.config.vocab_size
    with torch.no_grad():
        model(ids)
        layer = model.model.layers[0]
        hidden = layer.input_layernorm(model.model.embed_tokens(ids))
        proj = layer.self_attn.k_proj  # its forward hook quantizes: call the linear by hand
        keys = torch.nn.functional.linear(hidden, proj.weight, proj.bias)  # [1, 40, kv_heads * head_dim]
        deq = quantizer.keys[0](keys)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(40).unsqueeze(0))
        k = deq.view(1, 40, -1, 16).transpose(1, 2)
        _, expected = apply_rotary_pos_emb(k, k, cos, sin)
        unquantized, _ = apply_rotary_pos_emb(keys.view(1, 40, -1, 16).transpose(1, 2), k, cos, sin)
    assert torch.allclose(seen[1], expected, atol=1e-6)
    assert not torch.allclose(seen[1], unquantized, atol=1e-3)  # the quantization did act


def test_fit_records_true_bytes_below_sixteen_bit_and_smaller_with_fewer_bits():
    model, _ = tiny_llama(seed=0)
    windows = _windows(model.config.vocab_size)
    measured = {}
    for bits in (2, 4):
        quantizer = build(KVQuantConfig(), bits)
        quantizer.fit(model, windows)
        measured[bits] = quantizer.bytes_per_token(model)
    fp16 = model.config.num_hidden_layers * 2 * 2 * 16 * 2  # layers · (K, V) · kv_heads · head_dim · 2 bytes
    assert measured[2] < measured[4] < fp16
    metrics = quantizer.metrics()  # 1% of keys beyond their calibrated per-channel thresholds; values: at
    assert metrics["kvquant_outliers_keys"] == pytest.approx(0.01, abs=0.004)  # least each token's min and max
    assert metrics["kvquant_outliers_values"] >= 2 / 32 and metrics["kvquant_fit_levels_seconds"] > 0
    import json

    saved = json.loads(quantizer.artifacts()["kvquant_quantizers.json"])  # logged with the run
    assert len(saved["layers"]) == 2 and len(saved["layers"][0]["keys"]["levels"]) == 16
    assert len(saved["layers"][0]["keys"]["lower"]) == 32 and "lower" not in saved["layers"][0]["values"]


def test_fisher_needs_gradients_through_the_model():
    model, _ = tiny_llama(seed=0)
    windows = _windows(model.config.vocab_size, n=2)
    for layer in model.model.layers:  # a 4-bit-like input quantizer on o_proj: round() passes no gradient
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: (torch.round(args[0] * 8) / 8,))
    with pytest.raises(RuntimeError, match="Fisher information is zero.*kv.fisher=none"):
        build(KVQuantConfig(), 3).fit(model, windows)


def test_bad_settings_fail_with_the_fix():
    with pytest.raises(ValueError, match="kv.datatype='nf'"):
        KVQuantConfig(datatype="nf")
    with pytest.raises(ValueError, match="kv2, kv3, kv4"):
        build(KVQuantConfig(), 5)


def test_quantiles_of_any_size_equal_torch_quantile(monkeypatch):
    """torch.quantile refuses inputs over 16M values (a 7B model's calibration keys): chunked rows and numpy's
    quantile along the first dim give the same numbers."""
    from methods.core import kvcache

    x = _heavy_tailed(300, 40)
    small = {dim: kvcache.quantiles(x, [0.005, 0.995], dim) for dim in (0, -1)}
    monkeypatch.setattr(kvcache, "QUANTILE_MAX_ELEMENTS", 1000)
    for dim in (0, -1):
        assert torch.allclose(kvcache.quantiles(x, [0.005, 0.995], dim), small[dim], atol=1e-5)
    assert small[-1].shape == (2, 300, 1) and small[0].shape == (2, 40)
