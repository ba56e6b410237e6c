"""RCP on tiny-llama: LDP's quantizer (θ = 0 is uniform INT2 on the clip bounds, levels stay ordered and inside
the bounds under any training), the pipeline before training against the same rotation with RTN weights, training
with 4-bit activations and KV, the ablation switches, and the refusals."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.models import byte_tokenizer, tiny_gemma3, tiny_llama
from harness.runner import apply
from harness.spec import BitSpec
from methods import METHODS, rcp
from methods.act import rtn as act_rtn
from methods.base import QuantContext, Request, UnsupportedBits
from methods.core.arch import ARCHS, arch_of, decoder_linears
from methods.core.attention import attention_states
from methods.core.formats import LUTWeight
from methods.core.ldp import LDPQuantizer, ldp_levels, nearest_level
from methods.core.rotation import quarot_rotate
from methods.core.trainer import LoopConfig
from methods.kv import rtn as kv_rtn


def _quantizer(rows=6, bits=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ratios = 0.5 + 0.5 * torch.rand(2, rows, generator=gen)
    return LDPQuantizer(rows, bits, ratios[0], ratios[1]), torch.randn(rows, 64, generator=gen)


def test_theta_zero_is_uniform_int2_rtn_on_the_same_clip_bounds_bit_for_bit():
    quantizer, w = _quantizer()
    lo, hi = quantizer.bounds(w)
    step = (hi - lo) / 3
    codes = torch.clamp(torch.round((w - lo[:, None]) / step[:, None]), 0, 3)
    rtn = torch.lerp(lo[:, None].expand_as(w), hi[:, None].expand_as(w), codes / 3)  # lo + codes·(hi − lo)/3
    with torch.no_grad():
        fake = quantizer(w)
    assert torch.equal(nearest_level(torch.clamp(w, lo[:, None], hi[:, None]), quantizer.levels(w)), codes.long())
    assert torch.equal(fake, rtn)
    assert torch.allclose(fake, lo[:, None] + codes * step[:, None], atol=1e-6)  # the textbook form, to rounding
    frozen = quantizer.freeze(w)
    assert isinstance(frozen, LUTWeight) and torch.equal(frozen.codes.long(), codes.long())
    assert torch.equal(frozen.dequantize(), rtn.half().float())  # the stored table is fp16


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    lr=st.floats(1e-3, 50.0),
    steps=st.integers(1, 6),
    bits=st.sampled_from([2, 3, 4]),
)
def test_levels_stay_ordered_and_inside_the_clip_bounds_under_any_gradient_steps(seed, lr, steps, bits):
    quantizer, w = _quantizer(rows=5, bits=bits, seed=seed)
    w.requires_grad_(True)
    opt = torch.optim.SGD([w, *quantizer.parameters()], lr=lr)
    target = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 1))
    for _ in range(steps):
        opt.zero_grad()
        ((quantizer(w) - target) ** 2 * (1 + w.detach().abs())).sum().backward()
        opt.step()
    with torch.no_grad():
        lo, hi = quantizer.bounds(w)
        levels = ldp_levels(lo, hi, quantizer.theta)
        assert torch.isfinite(levels).all()
        assert (levels[:, 1:] >= levels[:, :-1]).all()
        assert (levels[:, 0] == lo).all() and (levels[:, -1] == hi).all()
        assert (levels >= lo[:, None]).all() and (levels <= hi[:, None]).all()


def test_gradients_pass_straight_through_inside_the_bounds_and_reach_the_partition():
    quantizer, w = _quantizer()
    w.requires_grad_(True)
    (quantizer(w) * torch.arange(w.shape[1]).float()).sum().backward()
    lo, hi = (b.detach() for b in quantizer.bounds(w.detach()))
    inside = (w > lo[:, None]) & (w < hi[:, None])
    assert torch.equal(w.grad[inside], torch.arange(w.shape[1]).float().expand_as(w)[inside])
    # outside the bounds no straight-through gradient; the row's min and max still get one through the bounds
    # (LWC's hi = sigmoid(γ)·max W is a function of W)
    extremes = torch.zeros_like(inside)
    extremes[torch.arange(w.shape[0]), w.argmin(1)] = True
    extremes[torch.arange(w.shape[0]), w.argmax(1)] = True
    clipped = ~inside & ~extremes
    assert clipped.any() and (w.grad[clipped] == 0).all()
    assert quantizer.theta.grad.abs().sum() > 0 and quantizer.gamma.grad.abs().sum() > 0


def _ctx(tmp_path, bits: str):
    tok = byte_tokenizer()
    rows = ["The tower stands on the hill above the river, " * 20, "short row", "A second long row of text. " * 30]
    windows = torch.tensor(tok(rows[0] * 2).input_ids[: 4 * 32]).reshape(4, 32)
    spec = BitSpec.parse(bits)
    act = act_rtn.build(act_rtn.RTNActConfig(clip_ratio=0.9), spec.a) if spec.quantizes_activations else None
    kv = kv_rtn.build(kv_rtn.RTNKVConfig(clip_ratio=0.95), spec.kv) if spec.quantizes_kv else None
    return QuantContext(
        seed=0,
        calibration=lambda: [windows[i : i + 1] for i in range(4)],
        tokenizer=tok,
        act=act,
        kv=kv,
        training=lambda: windows,
        training_rows=lambda: rows,
        cache_dir=str(tmp_path),
        checkpoint_dir=str(tmp_path / "ckpt"),
    )


def _cfg(**changes) -> rcp.RCPConfig:
    loop = changes.pop("loop", {})
    return replace(rcp.RCPConfig(), loop=replace(LoopConfig(lr=2e-5), **loop), **changes)


def test_rotation_clip_and_ldp_before_training_evaluate_like_the_same_rotation_with_rtn_weights(tmp_path):
    """Zero steps, 16-bit activations/KV, fixed clip ratio: RCP's model equals QuaRot's rotation with each weight
    row rounded to the uniform 4-level grid on [sigmoid(β)·min, sigmoid(γ)·max] (fp16 levels)."""
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    model, _ = tiny_llama(seed=0)
    cfg = _cfg(clip_init="ratio", clip_ratio=0.9, loop={"steps": 0})
    rcp.quantize(model, cfg, BitSpec.parse("w2a16kv16"), _ctx(tmp_path, "w2a16kv16"))
    reference, _ = tiny_llama(seed=0)
    quarot_rotate(reference, "hadamard", seed=0)
    with torch.no_grad():
        for _, _, _, linear in decoder_linears(reference):
            w = linear.weight
            lo, hi = 0.9 * w.amin(1).clamp(max=0), 0.9 * w.amax(1).clamp(min=0)
            codes = torch.clamp(torch.round((w - lo[:, None]) / ((hi - lo) / 3)[:, None]), 0, 3)
            linear.weight.copy_(torch.lerp(lo[:, None].expand_as(w), hi[:, None].expand_as(w), codes / 3).half())
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
    assert all(isinstance(m.qweight, LUTWeight) for _, _, _, m in decoder_linears(model))


def test_training_with_4bit_activations_and_kv_learns_the_partition_and_the_clip(tmp_path):
    model, _ = tiny_llama(seed=0)
    cfg = _cfg(loss="ce", clip_init="ratio", quantizer_lr=0.05, loop={"steps": 3, "lr": 1e-3})
    summary = apply(model, METHODS["rcp"], cfg, BitSpec.parse("w2a4kv4"), _ctx(tmp_path, "w2a4kv4"))  # as a run does
    states = attention_states(model)
    assert all(s.key_quant is not None and s.value_quant is not None for s in states)  # KV 4-bit, attached plainly
    assert all(m.act_quant is not None for _, _, _, m in decoder_linears(model))
    assert summary.metrics["train_steps"] == 3 and "rcp_levels.csv" in summary.artifacts
    tables = [m.qweight.levels[:, 0, :] for _, _, _, m in decoder_linears(model)]
    gaps = torch.cat([t.diff(dim=1) for t in tables])
    assert (gaps >= 0).all() and not torch.allclose(gaps, gaps[:, :1].expand_as(gaps), rtol=1e-2)  # non-uniform
    assert not (tmp_path / "ckpt" / "rcp.pt").exists()


def _logits_after(cfg: rcp.RCPConfig, bits: str, tmp_path) -> tuple[torch.Tensor, object]:
    model, _ = tiny_llama(seed=0)
    summary = apply(model, METHODS["rcp"], cfg, BitSpec.parse(bits), _ctx(tmp_path, bits))
    with torch.no_grad():
        return model(torch.arange(96).reshape(2, 48) % 250).logits, summary


def test_spinquant_rotation_at_zero_steps_is_the_hadamard_rotation(tmp_path):
    """SpinQuant's rotations start from QuaRot's (same seed), so with no rotation steps the two options give the
    same model, here through clip, 2-bit LDP and 4-bit activations/KV."""
    base = {"loss": "ce", "clip_init": "ratio", "loop": {"steps": 0}}
    hadamard, _ = _logits_after(_cfg(**base), "w2a4kv4", tmp_path / "h")
    spin, summary = _logits_after(_cfg(rotation="spinquant", rotation_steps=0, **base), "w2a4kv4", tmp_path)
    assert torch.allclose(spin, hadamard, atol=1e-4, rtol=1e-4)
    assert summary.notes["loop_weights"] == "none"  # activations and KV quantized: 16-bit weights while R learns


def test_spinquant_rotation_learns_then_the_quantizer_trains(tmp_path):
    cfg = _cfg(rotation="spinquant", rotation_steps=2, loss="ce", clip_init="ratio", loop={"steps": 1})
    hadamard, _ = _logits_after(_cfg(loss="ce", clip_init="ratio", loop={"steps": 1}), "w2a4kv4", tmp_path / "h")
    logits, summary = _logits_after(cfg, "w2a4kv4", tmp_path)
    metrics = summary.metrics
    assert metrics["rotation_train_steps"] == 2 and metrics["train_steps"] == 1  # rotation steps apart from QAT's
    assert metrics["rotation_orthogonality_error"] < 1e-4 and torch.isfinite(logits).all()
    assert not torch.allclose(logits, hadamard, atol=1e-3)  # the learned rotation moved the model
    assert not (tmp_path / "ckpt" / "rcp-rotations.pt").exists()


def test_ablation_switches_freeze_what_they_name(tmp_path, monkeypatch):
    seen = {}
    original_train = rcp.train

    def spy(model, *args, **kwargs):
        result = original_train(model, *args, **kwargs)
        seen.update({n: p.detach().clone() for n, p in model.named_parameters() if "weight_quantizer" in n})
        return result

    monkeypatch.setattr(rcp, "train", spy)
    ctx = _ctx(tmp_path, "w2a16kv16")
    for changes, frozen in (({"partition": "uniform"}, "theta"), ({"learn_clip": False}, "gamma")):
        seen.clear()
        model, _ = tiny_llama(seed=0)
        cfg = _cfg(loss="ce", clip_init="ratio", quantizer_lr=0.05, loop={"steps": 2, "lr": 1e-3}, **changes)
        rcp.quantize(model, cfg, BitSpec.parse("w2a16kv16"), ctx)
        start = 0.0 if frozen == "theta" else torch.logit(torch.tensor(0.982)).item()
        kept = [v for n, v in seen.items() if n.endswith(frozen)]
        moved = [v for n, v in seen.items() if not n.endswith(frozen) and not n.endswith("beta")]
        assert kept and all(torch.allclose(v, torch.full_like(v, start), atol=1e-4) for v in kept), changes
        assert any(not torch.allclose(v, torch.full_like(v, v.flatten()[0])) for v in moved), changes  # others learn


def test_kd_training_on_teacher_generations_runs(tmp_path):
    from methods.core.selfdistill import GenerationSettings

    model, _ = tiny_llama(seed=0)
    cfg = _cfg(cakld_batches=2, generation=GenerationSettings(max_prompts=2, max_new_tokens=40), loop={"steps": 2})
    summary = rcp.quantize(model, cfg, BitSpec.parse("w2a16kv16"), _ctx(tmp_path, "w2a16kv16"))
    assert 0 < summary.metrics["cakld_gamma"] < 1 and summary.metrics["selfdistill_prompts"] == 2
    assert summary.metrics["clip_linears"] > 0  # the clip search ran on the rotated model


@pytest.mark.parametrize(
    "bits, arch, kv_pre_rope, message",
    [
        ("w2g64a4kv4", "llama", False, "one level table per output channel"),
        ("w8a8kv8", "llama", False, "weight bits must be one of 2, 3, 4"),
        ("w2a4kv4", "gemma3", False, "residual rotation R1 is not exact"),
        ("w2a4kv4", "llama", True, "keys after RoPE"),
    ],
)
def test_refuses_before_loading(bits, arch, kv_pre_rope, message):
    kv = kv_rtn.build(kv_rtn.RTNKVConfig(keys_pre_rope=kv_pre_rope), 4)
    with pytest.raises(UnsupportedBits, match=message):
        rcp.supports(Request(BitSpec.parse(bits), ARCHS[arch], kv=kv))


def test_bad_settings_name_the_valid_values(tmp_path):
    model, _ = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="partition must be one of learned, uniform"):
        rcp.quantize(model, _cfg(partition="lloyd"), BitSpec.parse("w2a16kv16"), _ctx(tmp_path, "w2a16kv16"))
    assert arch_of(tiny_gemma3(seed=0)[0]).family == "gemma3"
