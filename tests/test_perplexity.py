import math

import torch
from torch import nn

from harness.evaluate.perplexity import perplexity


class UniformLM(nn.Module):
    """Logits all equal: every token has probability 1/vocab, so PPL must equal vocab exactly."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids, use_cache=False):
        return type("Out", (), {"logits": torch.zeros(*ids.shape, self.vocab)})()


def test_uniform_model_has_vocab_perplexity():
    ids = torch.randint(0, 50, (1, 1000))
    result = perplexity(UniformLM(50), ids, seqlen=100, batch_size=3, progress=False)
    assert math.isclose(result.ppl, 50.0, rel_tol=1e-5)
    assert result.windows == 10 and result.tokens_scored == 10 * 99 and result.tokens_total == 1000


def test_matches_manual_protocol_and_tail_is_dropped(tiny):
    model, _ = tiny
    ids = torch.randint(0, 256, (1, 530))
    result = perplexity(model, ids, seqlen=128, batch_size=2, progress=False)
    nlls = []
    for i in range(4):  # 530 // 128 = 4 windows, 18 tail tokens dropped
        window = ids[:, i * 128 : (i + 1) * 128]
        logits = model(window).logits
        nlls.append(nn.functional.cross_entropy(logits[0, :-1], window[0, 1:]))
    assert math.isclose(result.ppl, math.exp(float(torch.stack(nlls).mean())), rel_tol=1e-5)
    limited = perplexity(model, ids, seqlen=128, max_windows=1, progress=False)
    assert limited.windows == 1 and math.isclose(limited.ppl, math.exp(float(nlls[0])), rel_tol=1e-5)


def test_chunked_lm_head_gives_the_full_logits_perplexity():
    from harness.models import tiny_gemma3

    model, _ = tiny_gemma3(seed=0)
    ids = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(0))
    chunked = perplexity(model, ids, seqlen=100, batch_size=2, progress=False, chunk=7)
    with torch.no_grad():
        nll = [
            nn.functional.cross_entropy(
                model(ids[:, i * 100 : (i + 1) * 100]).logits[0, :-1], ids[0, i * 100 + 1 : (i + 1) * 100]
            )
            for i in range(4)
        ]
    assert math.isclose(chunked.ppl, math.exp(float(torch.stack(nll).mean())), rel_tol=1e-6)
