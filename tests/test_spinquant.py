"""SpinQuant: Cayley SGD keeps rotations orthogonal and descends; rotating at the quantizers gives the gradient of
rotating the weights; at step 0 SpinQuant is QuaRot with the same seed; a short training keeps R orthogonal."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from harness import models
from harness.cli_sweep import CONF_DIR
from harness.runner import apply, make_context, spec_from_config
from methods import METHODS
from methods.core.hadamard import random_hadamard_matrix
from methods.core.quantizers import DynamicQuantizer
from methods.core.rotation import RotatedQuantizer
from methods.core.stiefel import CayleySGD, cayley_step, orthogonality_error


def test_cayley_steps_stay_orthogonal_and_descend():
    """Maximise alignment with a target rotation: f(R) = −tr(Tᵀ R), gradient −T."""
    gen = torch.Generator().manual_seed(0)
    target, _ = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=torch.float64))
    rotation = torch.eye(24, dtype=torch.float64)
    losses = []
    for _ in range(60):
        losses.append(-float(torch.trace(target.T @ rotation)))
        rotation = cayley_step(rotation, -target, lr=0.5)
        assert orthogonality_error(rotation) < 1e-10
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < losses[0] - 5


def test_cayley_fixed_point_matches_the_exact_map():
    gen = torch.Generator().manual_seed(1)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    grad = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    assert torch.allclose(cayley_step(rotation, grad, 1.5), cayley_step(rotation, grad, 1.5, iterations=0), atol=1e-10)


def test_the_optimizer_clamps_the_step_and_refuses_non_square():
    param = torch.nn.Parameter(torch.eye(8))
    param.grad = 1e6 * torch.randn(8, 8)
    CayleySGD([param], lr=1.5).step()
    assert orthogonality_error(param.data) < 1e-5  # α = 1/‖W‖₁ keeps a huge gradient's step on the manifold
    bad = torch.nn.Parameter(torch.ones(2, 3))
    bad.grad = torch.ones(2, 3)
    with pytest.raises(ValueError, match="square"):
        CayleySGD([bad], lr=1.0).step()


def test_rotating_at_the_quantizer_gives_the_gradient_of_rotating_the_weights():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    quant = DynamicQuantizer(4, sym=False)
    r_a = torch.nn.Parameter(random_hadamard_matrix(16, 3))
    r_b = torch.nn.Parameter(random_hadamard_matrix(16, 3))
    xr = x @ r_a  # the authors' form: Q_ste(xR)·(WR)ᵀ
    y_weights = (xr + (quant(xr) - xr).detach()) @ (weight @ r_a).T
    wrapped = RotatedQuantizer(quant, lambda v: v @ r_b, lambda v: v @ r_b.T)
    y_quant = wrapped(x) @ weight.T
    assert torch.allclose(y_weights, y_quant, atol=1e-12)
    (y_weights**2).sum().backward()
    (y_quant**2).sum().backward()
    assert torch.allclose(r_a.grad, r_b.grad, atol=1e-10) and r_a.grad.abs().max() > 0


def _quantized_logits(method: str, overrides: list[str], data_dir: str, tmp_path, bits: str = "w4a4kv4"):
    base = [
        f"method={method}",
        "model=tiny-llama",
        f"bits={bits}",
        "budget=smoke",
        "calib.seqlen=64",
        "act=rtn",
        "kv=rtn",
    ]
    base += ["train.windows=4", "train.seqlen=32"] if METHODS[method].trains else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        spec = spec_from_config(compose("config", overrides=base + overrides))
    model, tokenizer = models.load(spec.model)
    ctx = make_context(spec.__class__(**{**spec.__dict__, "data_dir": data_dir}), tokenizer)
    ctx.checkpoint_dir = ctx.cache_dir = str(tmp_path)
    entry = METHODS[method]
    summary = apply(model, entry, entry.make_config(method, spec.method_params), spec.bits, ctx)
    with torch.no_grad():
        return model(torch.arange(120).reshape(2, 60) % 250).logits, summary


def test_step_zero_is_quarot_with_the_same_seed(data_dir, tmp_path):
    same = ["act.sym=true", "act.clip_ratio=0.9", "kv.clip_ratio=0.95"]  # QuaRot's recipe for both
    quarot, _ = _quantized_logits("quarot", [], data_dir, tmp_path / "q")
    spin, _ = _quantized_logits("spinquant", ["method.loop.steps=0", *same], data_dir, tmp_path / "s")
    assert torch.allclose(spin, quarot, atol=1e-4, rtol=1e-4)


def test_a_short_training_moves_the_rotations_and_keeps_them_orthogonal(data_dir, tmp_path):
    logits, summary = _quantized_logits("spinquant", ["method.loop.steps=3"], data_dir, tmp_path)
    assert torch.isfinite(logits).all()
    assert summary.metrics["train_steps"] == 3 and math.isfinite(summary.metrics["train_loss_last"])
    assert summary.metrics["rotation_orthogonality_error"] < 1e-4


def test_a_short_weight_only_training_learns_against_rtn_weights(data_dir, tmp_path):
    logits, summary = _quantized_logits(
        "spinquant", ["method.loop.steps=2", "method.variant=no_had"], data_dir, tmp_path, bits="w4g32a16kv16"
    )
    assert torch.isfinite(logits).all() and summary.notes["loop_weights"] == "rtn"
    assert summary.metrics["train_steps"] == 2 and summary.metrics["rotation_orthogonality_error"] < 1e-4


def test_plugins_that_need_calibration_are_refused_before_loading():
    from methods.base import Request, UnsupportedBits
    from methods.core.arch import arch_for_model_type
    from methods.core.bits import BitSpec
    from methods.kv.kvquant import KVQuantConfig
    from methods.kv.kvquant import build as build_kvquant
    from methods.spinquant import supports

    kv = build_kvquant(KVQuantConfig(keys_pre_rope=False), 4)
    assert kv.needs_calibration
    with pytest.raises(UnsupportedBits, match="kv=rtn"):
        supports(Request(BitSpec.parse("w4a16kv4"), arch_for_model_type("llama"), kv=kv))


def _random_rotations(model, seed: int):
    """R1 and non-symmetric R2s (Haar), so a transposed R2 anywhere shows."""
    from methods.core.learned_rotation import Rotations

    gen = torch.Generator().manual_seed(seed)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads

    def haar(n):
        return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0].float()

    return Rotations(haar(config.hidden_size), [haar(head_dim) for _ in range(config.num_hidden_layers)])


@pytest.mark.parametrize("variant", ["no_had", "had"])
def test_each_linear_frame_gives_the_weight_the_fused_model_holds(tiny, variant):
    """Frame.rotated_weight(W) = Bᵀ·W·A must be what rotate_model (+ the online transforms) store: the weights R
    learns against in the loop are the weights that are then quantized."""
    from methods.core.arch import decoder_linears
    from methods.core.learned_rotation import linear_frames
    from methods.core.rotation import fold_norms, install_online_transforms, rotate_model

    tiny, _ = tiny
    fold_norms(tiny)
    rotations = _random_rotations(tiny, 4)
    online, o_proj_heads = variant == "had", True
    names = {id(module): name for name, _, _, module in decoder_linears(tiny)}
    with torch.no_grad():
        frames = linear_frames(tiny, rotations, online, o_proj_heads)
        expected = {names[id(lin)]: frame.rotated_weight(lin.weight) for lin, frame in frames}
        for lin, frame in linear_frames(tiny, rotations, online, o_proj_heads):
            assert torch.allclose(frame.unrotated_weight(frame.rotated_weight(lin.weight)), lin.weight, atol=1e-5)
    assert len(expected) == 7 * tiny.config.num_hidden_layers
    rotate_model(tiny, rotations.r1.detach().double(), [r.detach().double() for r in rotations.r2])
    if online:
        install_online_transforms(tiny, cross_heads=o_proj_heads)
    for name, _, _, module in decoder_linears(tiny):
        assert torch.allclose(module.weight, expected[name], atol=1e-5), name


def test_weight_only_learning_puts_rtn_weights_in_the_loop(tiny):
    """At w4g32a16kv16 nothing else depends on R: `auto` puts the weights' RTN quantizer (where the rotated model
    holds them) in the loss, which then has a gradient in R1 and every R2; the model's function is the rotated,
    RTN-quantized model's; unwrapping restores the weights bit for bit."""
    from methods.core.arch import decoder_linears
    from methods.core.bits import BitSpec
    from methods.core.learned_rotation import unwrap_weights, wrap_weights
    from methods.core.quantizers import WeightQuantizer
    from methods.core.rotation import fold_norms, rotate_model
    from methods.spinquant import SpinQuantConfig, loop_quantizer, loop_weights

    cfg = SpinQuantConfig(variant="no_had")
    bits = BitSpec.parse("w4g32a16kv16")
    assert loop_weights(cfg, bits) == "rtn" and loop_weights(cfg, BitSpec.parse("w4a4kv4")) == "none"
    assert loop_weights(SpinQuantConfig(loop_weights="none"), bits) == "none"
    with pytest.raises(ValueError, match="loop_weights must be one of"):
        loop_weights(SpinQuantConfig(loop_weights="gptq"), bits)
    tiny = tiny[0].double()
    fold_norms(tiny)
    original = {name: module.weight.detach().clone() for name, _, _, module in decoder_linears(tiny)}
    rotations = _random_rotations(tiny, 5).double()
    ids = torch.arange(96).reshape(2, 48) % tiny.config.vocab_size
    wrap_weights(tiny, rotations, False, cfg.o_proj_heads, loop_quantizer(cfg, bits))
    logits = tiny(ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert rotations.r1.grad.abs().max() > 0 and all(r.grad.abs().max() > 0 for r in rotations.r2)
    unwrap_weights(tiny)
    for name, _, _, module in decoder_linears(tiny):
        assert torch.equal(module.weight, original[name]), name
    quantizer = WeightQuantizer(4, 32, sym=cfg.w_sym, sym_grid=cfg.w_sym_grid)
    with torch.no_grad():
        rotate_model(tiny, rotations.r1.detach(), [r.detach() for r in rotations.r2])
        for _, _, _, module in decoder_linears(tiny):
            module.weight.copy_(quantizer.straight_through(module.weight))
        # the two forms differ only by rounding (HF's RMSNorm computes in fp32: ~2e-7); one flipped code would not
        assert torch.allclose(tiny(ids).logits, logits.detach(), atol=1e-5)
