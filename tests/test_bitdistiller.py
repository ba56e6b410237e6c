"""BitDistiller on tiny-llama: the clip search against the authors' formula, the training quantizer, the
self-distillation cache, and the method end to end (zero steps = AWQ-style RTN of the weights)."""

from dataclasses import replace

import pytest
import torch

from harness.models import byte_tokenizer, tiny_llama
from harness.spec import BitSpec
from methods import bitdistiller
from methods.base import QuantContext, Request, UnsupportedBits
from methods.core.arch import ARCHS, decoder_linears
from methods.core.clip_search import ClipSearchSettings, asym_minmax_fake_quant, search_clip
from methods.core.formats import QuantizedWeight
from methods.core.selfdistill import GenerationSettings, cached_generations, pack


def _authors_search(w, x, bits, group, n_grid=20, max_shrink=0.5):
    """autoclip.auto_2clip_layer's arithmetic, written out with its broadcast product."""
    w = w.reshape(w.shape[0], 1, -1, group)
    x = x.reshape(1, x.shape[0], -1, group)
    org_max, org_min = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
    best_max, best_min, best = org_max.clone(), org_min.clone(), torch.full_like(org_max, 1e9)
    org_out = (x * w).sum(-1)
    for i in range(int(max_shrink * n_grid)):
        for j in range(int(max_shrink * n_grid)):
            max_val, min_val = org_max * (1 - i / n_grid), org_min * (1 - j / n_grid)
            q = asym_minmax_fake_quant(torch.clamp(w, min_val, max_val), bits)
            err = ((x * q).sum(-1) - org_out).pow(2).mean(1).view(best.shape)
            better = err < best
            best[better], best_max[better], best_min[better] = err[better], max_val[better], min_val[better]
    return best_max.squeeze(1), best_min.squeeze(1)


def test_clip_search_is_the_authors_search():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=gen)
    w[0, 3] = 9.0  # an outlier the search should clip
    x = torch.randn(40, 64, generator=gen)
    ours = search_clip(w, x, lambda g: asym_minmax_fake_quant(g, 2), 32, ClipSearchSettings())
    theirs = _authors_search(w, x, 2, 32)
    assert torch.allclose(ours[0], theirs[0]) and torch.allclose(ours[1], theirs[1])
    assert ours[0][0, 0] < 9.0  # the outlier's group is clipped


def test_training_quantizer_rounds_half_away_and_freezes_to_its_forward():
    quantizer = bitdistiller.AsymMinMaxSTE(2, 32)
    w = torch.randn(4, 48, generator=torch.Generator().manual_seed(0))  # 48 = 1.5 groups of 32
    frozen = quantizer.freeze(w)
    assert isinstance(frozen, QuantizedWeight) and frozen.scales.shape == (4, 2)
    assert torch.allclose(frozen.dequantize(), quantizer(w), atol=1e-6)
    assert torch.equal(
        bitdistiller._round_half_away(torch.tensor([0.5, 1.5, -0.5, 2.5])), torch.tensor([1.0, 2, -1, 3])
    )
    w.requires_grad_(True)
    quantizer(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight through (no clamp inside the min/max range)


@pytest.mark.parametrize("bits", ["w1.58a16kv16", "w8a16kv16", "w2g64a4kv16"])
def test_refuses(bits):
    with pytest.raises(UnsupportedBits, match="bitdistiller does not support"):
        bitdistiller.supports(Request(BitSpec.parse(bits), ARCHS["llama"]))


def _cfg(loop=None, **fields) -> bitdistiller.BitDistillerConfig:
    default = bitdistiller.BitDistillerConfig()
    return replace(default, loop=replace(default.loop, **(loop or {})), **fields)


def _ctx(tmp_path):
    tok = byte_tokenizer()
    rows = ["The tower stands on the hill above the river, " * 20, "short row", "A second long row of text. " * 30]
    windows = torch.tensor(tok(rows[0] * 2).input_ids[: 4 * 32]).reshape(4, 32)
    calib = [windows[i : i + 1] for i in range(4)]
    return QuantContext(
        seed=0,
        calibration=lambda: calib,
        tokenizer=tok,
        training=lambda: windows,
        training_rows=lambda: rows,
        cache_dir=str(tmp_path),
        checkpoint_dir=str(tmp_path / "ckpt"),
    )


def test_teacher_generations_are_cached_and_packed(tmp_path):
    model, tok = tiny_llama(seed=0)
    settings = GenerationSettings(max_prompts=2, max_new_tokens=6, batch_size=2)
    prompts = ["The tower stands", "A second long"]
    first, cached = cached_generations(model, tok, prompts, settings, 0, tmp_path)
    again, cached_again = cached_generations(model, tok, prompts, settings, 0, tmp_path)
    assert (cached, cached_again) == (False, True) and first == again
    assert all(seq[: len(tok(p).input_ids)] == tok(p).input_ids for seq, p in zip(first, prompts, strict=True))
    windows = pack(first, 8, tok.eos_token_id)
    assert windows.shape[1] == 8 and windows.shape[0] == sum(len(s) + 1 for s in first) // 8


def test_zero_steps_without_clipping_is_awq_rtn_and_clipping_moves_the_weights(tmp_path):
    bits = BitSpec.parse("w2g32a16kv16")
    plain, _ = tiny_llama(seed=0)
    originals = {name: m.weight.detach().clone() for name, _, _, m in decoder_linears(plain)}
    bitdistiller.quantize(plain, _cfg({"steps": 0}, clip=False), bits, _ctx(tmp_path))
    for name, _, _, module in decoder_linears(plain):
        rows, cols = originals[name].shape
        expected = asym_minmax_fake_quant(originals[name].reshape(rows, -1, 32), 2).reshape(rows, cols)
        assert torch.allclose(module.weight, expected, atol=1e-6), name
    clipped, _ = tiny_llama(seed=0)
    summary = bitdistiller.quantize(clipped, _cfg({"steps": 0}), bits, _ctx(tmp_path))
    assert summary.metrics["clip_linears"] == 2 * 5 and summary.metrics["clip_range_kept"] < 1.0  # q/k skipped
    q_proj = clipped.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q_proj, plain.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(clipped.model.layers[0].mlp.down_proj.weight, plain.model.layers[0].mlp.down_proj.weight)


def test_self_distillation_training_runs_and_logs_gamma(tmp_path):
    model, _ = tiny_llama(seed=0)
    generation = GenerationSettings(max_prompts=2, max_new_tokens=40)
    cfg = _cfg({"steps": 2, "lr": 1e-3}, cakld_batches=2, generation=generation)
    summary = bitdistiller.quantize(model, cfg, BitSpec.parse("w3g32a16kv16"), _ctx(tmp_path))
    assert 0 < summary.metrics["cakld_gamma"] < 1 and summary.metrics["train_steps"] == 2
    assert summary.metrics["selfdistill_prompts"] == 2  # the two rows longer than 512 characters
    assert all(isinstance(m.qweight, QuantizedWeight) for _, _, _, m in decoder_linears(model))
    assert not (tmp_path / "ckpt" / "bitdistiller.pt").exists()  # removed once the run finished


def test_nf3_is_the_authors_table_with_a_scale_per_sign():
    w = torch.tensor([[-2.0, -0.6, -0.2, 0.0, 0.15, 0.5, 0.9, 1.0]])  # group max 1.0, |min| 2.0
    quantizer = bitdistiller.NF3STE(8)
    expected = torch.tensor(
        [[-2.0, -0.2469314038753510 * 2, 0.0, 0.0, 0.1833375245332718, 0.3819939494132996, 1.0, 1.0]]
    )
    assert torch.allclose(quantizer(w), expected, atol=1e-6)
    frozen = quantizer.freeze(w)
    assert torch.allclose(frozen.dequantize(), expected, atol=1e-6)
    assert frozen.storage_bits() == 8 * 3 + (8 + 2) * 16  # codes + table + two scales


def test_nf3_runs_end_to_end_and_refuses_other_widths(tmp_path):
    model, _ = tiny_llama(seed=0)
    bitdistiller.quantize(model, _cfg({"steps": 0}, quant_type="nf3"), BitSpec.parse("w3g32a16kv16"), _ctx(tmp_path))
    assert all(type(m.qweight).__name__ == "SignedLUTWeight" for _, _, _, m in decoder_linears(model))
    with pytest.raises(ValueError, match="'nf3' at 3 bits"):
        bitdistiller.quantize(model, _cfg(quant_type="nf3"), BitSpec.parse("w2g32a16kv16"), _ctx(tmp_path))
