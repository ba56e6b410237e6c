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


def _quantized_logits(method: str, overrides: list[str], data_dir: str, tmp_path):
    base = [
        f"method={method}",
        "model=tiny-llama",
        "bits=w4a4kv4",
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
