"""QuaRot's rotations preserve the FP model; GPTQ/QuaRot methods run end to end on tiny-llama."""

import torch
from compose import quantize

from harness.models import tiny_llama
from harness.spec import BitSpec
from methods import gptq, quarot
from methods.base import QuantContext
from methods.core.hadamard import random_orthogonal_matrix
from methods.core.qlinear import QLinear
from methods.core.rotation import fold_norms, rotate_residual

IDS = torch.arange(200).reshape(2, 100) % 250


def _ctx(n=8, seqlen=64):
    gen = torch.Generator().manual_seed(0)
    return QuantContext(
        seed=0, calibration=lambda: [torch.randint(0, 256, (1, seqlen), generator=gen) for _ in range(n)]
    )


@torch.no_grad()
def _logits(model):
    return model(IDS).logits


def test_fold_and_rotate_residual_preserve_logits(tiny):
    model, _ = tiny
    ref = _logits(model)
    fold_norms(model)
    assert torch.allclose(_logits(model), ref, rtol=0, atol=1e-4 * ref.abs().max())
    rotate_residual(model, random_orthogonal_matrix(model.config.hidden_size, seed=3))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert (_logits(model) - ref).abs().max() < 1e-4 * ref.abs().max()


def test_quarot_at_16_bits_equals_fp_model(tiny):
    model, _ = tiny
    ref = _logits(model)
    summary = quarot.quantize(model, quarot.QuaRotConfig(), BitSpec.parse("w16a16kv16"), _ctx())
    out = _logits(model)
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    assert isinstance(model.model.layers[0].mlp.down_proj, QLinear)
    assert "exact Hadamard=True" in summary.notes["r4_down_proj"]  # 192 = 12·16


def test_quarot_and_gptq_quantize_end_to_end(tiny):
    model, _ = tiny
    ref = _logits(model)
    for name, cfg in (
        ("gptq", gptq.GPTQConfig()),
        ("quarot", quarot.QuaRotConfig()),
        ("quarot", quarot.QuaRotConfig(weights="rtn", rotation="random")),
    ):
        fresh, _ = tiny_llama(seed=0)
        summary = quantize(fresh, name, cfg, "w4a4kv4", _ctx().calibration)
        out = _logits(fresh)
        assert torch.isfinite(out).all() and 0 < (out - ref).abs().max() < 2.0
        down = fresh.model.layers[1].mlp.down_proj
        assert isinstance(down, QLinear) and down.qweight is not None and down.act_quant is not None
        if "gptq_objective" in summary.metrics:
            assert summary.metrics["gptq_objective"] < summary.metrics["rtn_objective"]
