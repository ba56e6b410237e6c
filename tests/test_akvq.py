"""AKVQ-VL as a KV plug-in (methods/kv/akvq.py, reconstructed from the public description) and its per-token
mixed-precision format (methods/core/mixedkv.py)."""

from __future__ import annotations

import json

import pytest
import torch

from harness.models import tiny_gemma3, tiny_llama
from methods.core.hadamard import hadamard_matrix
from methods.core.mixedkv import encode_mixed
from methods.core.quantizers import fake_quantize_dynamic
from methods.core.rotation import quarot_rotate
from methods.kv import akvq
from methods.kv.akvq import AKVQConfig, AKVQQuantizer, build, received_attention, select_pivots
from methods.kv.rtn import RTNKVConfig
from methods.kv.rtn import build as build_rtn

NO_PIVOTS = {"pivot_fraction": 0.0, "first_token": False}


def _windows(vocab: int, n: int = 3, length: int = 64):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(n)]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ids(model, length: int = 48):
    return (torch.arange(length).reshape(1, length) * 7) % model.config.vocab_size


@pytest.mark.parametrize("tiny", [tiny_llama, tiny_gemma3])
def test_the_wht_alone_at_sixteen_bits_leaves_the_model_unchanged(tiny):
    """Rotate, keep 16 bits (no rounding), rotate back: the WHT is orthogonal, so logits stay (1e-5)."""
    model, _ = tiny(seed=0)
    ids = _ids(model)
    reference = _logits(model, ids)
    AKVQQuantizer(16, AKVQConfig(**NO_PIVOTS)).attach(model)
    out = _logits(model, ids)
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_without_pivots_or_wht_it_is_rtn_per_token_bit_for_bit():
    model, _ = tiny_llama(seed=0)
    ids = _ids(model)
    build_rtn(RTNKVConfig(), 2).attach(model)
    rtn = _logits(model, ids)
    build(AKVQConfig(wht=False, **NO_PIVOTS), 2).attach(model)
    assert torch.equal(_logits(model, ids), rtn)


def test_without_pivots_it_is_rtn_per_token_on_the_rotated_cache():
    model, _ = tiny_llama(seed=0)
    quantizer = build(AKVQConfig(**NO_PIVOTS), 2)
    quantizer.attach(model)
    x = torch.randn(1, 2, 10, 16, generator=torch.Generator().manual_seed(1))
    h = hadamard_matrix(16).float()
    expected = fake_quantize_dynamic(x @ h.T, 2, False) @ h
    assert torch.equal(quantizer.layers[0].keys(x), expected)
    assert torch.equal(quantizer.layers[0].values(x), expected)
    assert not torch.equal(expected, fake_quantize_dynamic(x, 2, False))  # the rotation acted


def test_received_attention_of_uniform_causal_attention_is_hand_computed():
    """Zero queries: each query spreads evenly over its causal prefix, so token j receives
    (1/N) Σ_{i ≥ j} 1/(i + 1)."""
    n = 6
    query, key = torch.zeros(1, 2, n, 4), torch.randn(1, 1, n, 4)
    received = received_attention(torch.nn.Module(), query, key, None)[0]
    expected = torch.tensor([sum(1 / (i + 1) for i in range(j, n)) / n for j in range(n)])
    assert torch.allclose(received, expected, atol=1e-6) and received.sum() == pytest.approx(1.0)
    bool_mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    assert torch.allclose(received_attention(torch.nn.Module(), query, key, bool_mask)[0], expected, atol=1e-6)


@pytest.mark.parametrize("window", [None, 50])
def test_received_attention_equals_the_column_means_of_the_softmax(window):
    """Grouped queries, more queries than one block, causal or sliding-window bool mask (Gemma 3's local
    layers): the blocked computation equals the dense softmax's column sums / (heads · queries)."""
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 6, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g) * 2
    allowed = torch.ones(300, 300, dtype=torch.bool).tril()
    if window:
        allowed &= ~torch.ones(300, 300, dtype=torch.bool).tril(-window)
    scores = query @ key.repeat_interleave(3, dim=1).transpose(-1, -2) * 0.25
    dense = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    expected = dense.sum(dim=(1, 2)) / (6 * 300)
    mask = allowed[None, None] if window else None
    assert torch.allclose(received_attention(torch.nn.Module(), query, key, mask), expected, atol=1e-7)


def test_a_token_every_query_attends_to_is_the_pivot():
    n, d = 200, 8
    g = torch.Generator().manual_seed(0)
    key = torch.randn(1, 1, n, d, generator=g) * 0.1
    query = torch.randn(1, 2, n, d, generator=g) * 0.1
    key[0, 0, 7] = 0.0
    key[0, 0, 7, 0] = 30.0  # token 7: every query with a positive first entry looks at it
    query[..., 0] = 1.0
    received = received_attention(torch.nn.Module(), query, key, None)
    chosen = select_pivots(received, threshold=10.0, fraction=0.01, first_token=True)
    assert chosen[0].nonzero().flatten().tolist() == [0, 7]  # cap ⌊0.01 · 200⌋ = 2: token 7, plus the first


def test_pivot_selection_on_a_hand_made_score_vector():
    """N = 200, threshold 10 / N = 0.05, cap ⌊0.02 · 200⌋ = 4: of the five eligible, the four highest."""
    received = torch.full((1, 200), 0.001)
    for position, share in ((3, 0.2), (50, 0.06), (60, 0.3), (90, 0.051), (120, 0.052), (150, 0.049)):
        received[0, position] = share
    chosen = select_pivots(received, threshold=10.0, fraction=0.02, first_token=False)
    assert chosen[0].nonzero().flatten().tolist() == [3, 50, 60, 120]
    with_first = select_pivots(received, threshold=10.0, fraction=0.02, first_token=True)
    assert with_first[0].nonzero().flatten().tolist() == [0, 3, 50, 60, 120]
    assert not select_pivots(received, threshold=10.0, fraction=0.0, first_token=False).any()


def test_pivots_get_their_bits_and_a_decode_step_does_not_reselect(monkeypatch):
    model, _ = tiny_llama(seed=0)
    quantizer = build(AKVQConfig(pivot_fraction=0.05), 2)
    quantizer.attach(model)
    calls = []
    real = akvq.received_attention
    monkeypatch.setattr(akvq, "received_attention", lambda *a: calls.append(1) or real(*a))
    ids = _ids(model, 40)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        layer = quantizer.layers[0]
        chosen = layer.pivots.clone()
        assert len(calls) == 2 and chosen[0, 0] and chosen.sum() <= 1 + 2  # first token + ⌊0.05 · 40⌋
        bits = layer.token_bits(1, 41)
        assert torch.equal(bits[0, :40] == 8, chosen[0]) and bits[0, 40] == 2
        model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True)  # one cached decode step
    assert len(calls) == 2 and torch.equal(layer.pivots, chosen)


def test_the_format_stores_the_fake_quantizers_codes_and_counts_its_packed_bytes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, 16, generator=g)
    token_bits = torch.full((30,), 2)
    token_bits[[0, 7]] = 8
    token_bits[11] = 16
    stored = encode_mixed(x, token_bits, 2, 8, False)
    assert stored.storage_bits() == sum(t.numel() * t.element_size() for t in stored.pack().values()) * 8
    words, groups = 30 - 3, 2 * 2  # base tokens: 32 codes → 2 words; 4 groups of scale + zero
    expected = words * (2 * 32 + groups * 32) + 2 * (8 * 32 + groups * 32 + 32) + (2 * 16 * 16 + 32)
    assert stored.storage_bits() == expected
    fake = torch.empty_like(x)
    for bits in (2, 8):
        rows = token_bits == bits
        fake[rows] = fake_quantize_dynamic(x[rows], bits, False, 1.0, 8)
    fake[11] = x[11]  # 16 bits: the fake quantizer leaves it as is (as a kv16 run); the format keeps fp16
    deq = stored.dequantize()
    assert torch.equal(deq[11], x[11].half().float())
    assert torch.allclose(deq, fake, atol=3 * 2**-11 * float(x.abs().max()))  # fp16 scales, 2-bit codes ≤ 3


def test_measured_bytes_equal_the_uniform_count_without_pivots_and_grow_with_them():
    model, _ = tiny_llama(seed=0)
    windows = _windows(model.config.vocab_size)
    plain = build(AKVQConfig(**NO_PIVOTS), 2)
    plain.fit(model, windows)
    uniform = build_rtn(RTNKVConfig(), 2).bytes_per_token(model)
    assert plain.bytes_per_token(model) == pytest.approx(uniform)
    with_pivots = build(AKVQConfig(pivot_fraction=0.05), 2)
    with_pivots.fit(model, windows)
    per_token = 2 * 2 * (16 * 2 + 32) / 8  # (K, V) · kv_heads · (codes + scale + zero) bits, per layer
    pivots_per_token = with_pivots.metrics()["akvq_pivot_fraction"]  # per layer
    assert pivots_per_token >= 1 / 64  # at least the first token of each window
    extra_per_pivot = 2 * 2 * (16 * 8 - 16 * 2) / 8 + 2 * 4  # wider codes, an int32 position in K and V
    layers = model.config.num_hidden_layers
    expected = layers * per_token + layers * pivots_per_token * extra_per_pivot
    assert with_pivots.bytes_per_token(model) == pytest.approx(expected)
    saved = json.loads(with_pivots.artifacts()["akvq_pivots.json"])["first_window_pivots"]
    assert len(saved) == layers and all(0 in layer for layer in saved)


def test_a_hadamard_rotated_cache_is_not_rotated_twice():
    model, _ = tiny_llama(seed=0)
    quarot_rotate(model, "hadamard", seed=0)
    quantizer = build(AKVQConfig(), 2)
    quantizer.attach(model)
    assert not quantizer.layers[0].rotate_keys and not quantizer.layers[0].rotate_values
    assert quantizer.notes()["akvq_wht_keys"].startswith("skipped")
    fresh, _ = tiny_llama(seed=0)
    unrotated = build(AKVQConfig(), 2)
    unrotated.attach(fresh)
    assert unrotated.layers[0].rotate_keys and unrotated.notes()["akvq_wht_values"] == "applied"


def test_text_tokens_get_text_bits_from_a_synthetic_modality_mask():
    quantizer = AKVQQuantizer(2, AKVQConfig(text_bits=4, **NO_PIVOTS))  # build() refuses it for text models
    model, _ = tiny_llama(seed=0)
    quantizer.attach(model)
    text = torch.zeros(1, 10, dtype=torch.bool)
    text[0, 6:] = True  # an "image" prefix of 6 tokens, then text
    quantizer.set_modality(text)
    bits = quantizer.layers[0].token_bits(1, 12)
    assert bits[0].tolist() == [2] * 6 + [4] * 6  # generated tokens (past the mask) count as text
    quantizer.set_modality(None)
    with pytest.raises(ValueError, match="modality mask"):
        quantizer.layers[0].token_bits(1, 12)


def test_bad_settings_fail_with_the_fix():
    with pytest.raises(ValueError, match="leave kv.text_bits unset"):
        build(AKVQConfig(text_bits=4), 2)
    with pytest.raises(ValueError, match="kv2, kv3, kv4 or kv8"):
        build(AKVQConfig(), 5)
    model, _ = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="must divide head_dim=16"):
        build(AKVQConfig(group_size=6), 2).attach(model)
