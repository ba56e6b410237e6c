"""RSAVQ (methods/rsavq.py, reconstructed from the public description) on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from harness.models import tiny_llama
from methods.base import QuantContext, Request, UnsupportedBits
from methods.core.arch import ARCHS
from methods.core.bits import BitSpec
from methods.core.formats import VQWeight
from methods.core.qlinear import QLinear
from methods.rsavq import RSAVQConfig, quantize, supports, vector_dim


def _windows(vocab: int, n: int = 4, length: int = 64):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


def _run(cfg: RSAVQConfig, bits: str = "w2a16kv16"):
    model, _ = tiny_llama(seed=0)
    windows = _windows(model.config.vocab_size)
    summary = quantize(model, cfg, BitSpec.parse(bits), QuantContext(seed=0, calibration=lambda: windows))
    return model, summary


def _vq_weights(model):
    return [m.qweight for m in model.modules() if isinstance(m, QLinear) and isinstance(m.qweight, VQWeight)]


@pytest.mark.parametrize("edsg,wcsg", [(False, False), (True, False), (True, True)])
def test_every_linear_becomes_vectors_on_the_average_width(edsg, wcsg):
    model, summary = _run(RSAVQConfig(edsg=edsg, wcsg=wcsg, kmeans_iters=5))
    qweights = _vq_weights(model)
    assert len(qweights) == 2 * 7  # 2 blocks × q, k, v, o, gate, up, down
    for q in qweights:
        widths = q.bits_per_block() // 4  # index bits / dim = bits per weight
        assert widths.float().mean() == 2.0 and set(widths.tolist()) <= ({1, 2, 3} if wcsg else {2})
    blocks = json.loads(summary.artifacts["rsavq_allocation.json"])["blocks"]
    assert len(blocks) == 14 and all(sum(b) == 2 * len(b) for b in blocks.values())
    assert summary.metrics["vq_objective"] > 0


def test_without_fisher_nothing_reads_gradients(monkeypatch):
    import methods.rsavq as rsavq

    monkeypatch.setattr(rsavq, "weight_fisher", lambda *a: pytest.fail("plain VQ needs no Fisher"))
    _run(RSAVQConfig(edsg=False, wcsg=False, kmeans_iters=3))


def test_supports_and_codebook_limits_fail_with_the_fix():
    arch = ARCHS["llama"]
    supports(Request(BitSpec.parse("w2a16kv16"), arch))
    for bits in ("w2g64a16kv16", "w16a16kv16", "w8a16kv16"):
        with pytest.raises(UnsupportedBits, match="rsavq quantizes weights"):
            supports(Request(BitSpec.parse(bits), arch))
    with pytest.raises(UnsupportedBits, match="leave method.dim unset or use method.dim=2"):
        _run(RSAVQConfig(dim=4, kmeans_iters=1), "w3a16kv16")
    assert vector_dim(RSAVQConfig(), 2) == 4 and vector_dim(RSAVQConfig(), 3) == 2 and vector_dim(RSAVQConfig(), 4) == 2
    assert vector_dim(RSAVQConfig(wcsg=False), 3) == 4  # 2^(3·4) = 4,096 centroids at most
