"""KL to FP and top-1 agreement (harness/evaluate/fidelity.py) against textbook cases."""

from __future__ import annotations

import math

import pytest
import torch

from harness.evaluate.fidelity import Comparer, Recorder, coarse_kl, top_k_log_probs


def test_a_known_two_token_kl():
    """P = (0.5, 0.5), Q = (0.9, 0.1): KL = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5108 nats."""
    log_p = torch.log(torch.tensor([[0.5, 0.5]]))
    log_q = torch.log(torch.tensor([[0.9, 0.1]]))
    ids, top = top_k_log_probs(log_p, k=1)  # one stored token + the rest: still the whole distribution
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert float(coarse_kl(log_q, ids, top)) == pytest.approx(expected, rel=1e-3)


def test_with_every_token_stored_it_is_the_exact_kl_and_otherwise_a_lower_bound():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(20, 50, generator=g) * 2, torch.randn(20, 50, generator=g) * 2
    log_q = torch.log_softmax(q_logits, -1)
    exact = torch.nn.functional.kl_div(log_q, torch.log_softmax(p_logits, -1), log_target=True, reduction="none").sum(
        -1
    )
    log_p = torch.log_softmax(p_logits, -1)
    full = coarse_kl(log_q, *top_k_log_probs(log_p, k=50))
    assert torch.allclose(full, exact, rtol=2e-3, atol=1e-3)  # fp16-stored log-probabilities
    for k in (1, 5, 20):
        coarse = coarse_kl(log_q, *top_k_log_probs(log_p, k=k))
        assert bool((coarse >= -1e-4).all()) and bool((coarse <= exact + 2e-3).all())


def test_a_model_compared_with_itself_agrees_fully_and_a_different_one_does_not():
    g = torch.Generator().manual_seed(1)
    logits = torch.log_softmax(torch.randn(2, 7, 30, generator=g), dim=-1)  # what perplexity() hands over
    recorder = Recorder(windows=2, positions=7, k=8)
    recorder(0, 0, logits[:, :4])  # two chunks of positions, as perplexity() hands them over
    recorder(0, 4, logits[:, 4:])
    same = Comparer(recorder.reference())
    same(0, 0, logits)
    assert same.metrics()["kl_vs_fp"] == pytest.approx(0, abs=2e-4) and same.metrics()["top1_vs_fp"] == 1.0
    other = Comparer(recorder.reference())
    flipped = logits.clone()
    flipped[0, 0] = torch.log_softmax(-flipped[0, 0], dim=-1)  # one position's ranking reversed: its top-1 differs
    other(0, 0, flipped)
    assert other.metrics()["top1_vs_fp"] == pytest.approx(13 / 14) and other.metrics()["kl_vs_fp"] > 0.01


def test_observing_the_pass_leaves_perplexity_unchanged():
    from harness.evaluate.fidelity import Recorder
    from harness.evaluate.perplexity import perplexity
    from harness.models import tiny_llama

    model, _ = tiny_llama(seed=0)
    ids = torch.arange(3 * 64).reshape(1, -1) % model.config.vocab_size
    plain = perplexity(model, ids, 64, progress=False, chunk=16)
    observed = perplexity(model, ids, 64, progress=False, chunk=16, on_chunk=Recorder(3, 63, k=4))
    assert observed.nll == pytest.approx(plain.nll, rel=1e-6) and observed.window_nll == pytest.approx(plain.window_nll)
