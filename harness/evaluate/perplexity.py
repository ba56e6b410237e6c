"""WikiText-2 perplexity, the GPTQ/QuaRot protocol.

The test split's rows are joined with "\\n\\n" and tokenized once; the token stream is cut into
non-overlapping windows of `seqlen` (the tail shorter than `seqlen` is dropped); each window is scored
independently (no BOS added, no context carried over) and PPL = exp(mean NLL over all predicted tokens,
i.e. seqlen − 1 per window). `max_windows` takes the first windows only (a budget cut, logged). A window whose loss is
nan/inf stops the evaluation (`nonfinite_window`): the model diverged, and no later window changes that.

The loss is taken from the final hidden states `chunk` positions at a time (lm_head + cross-entropy per chunk),
so no [seqlen × vocabulary] logits tensor is ever built whole — 2 GB per window for Gemma 3's 262k vocabulary.
Models of a family without an architecture adapter fall back to the full logits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from methods.core.arch import UnsupportedArchitecture, arch_of


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float
    windows: int
    tokens_scored: int  # predicted tokens = windows · (seqlen − 1)
    tokens_total: int  # tokens in the split
    seqlen: int
    seconds: float
    nonfinite_window: int | None = None  # the window whose loss was nan/inf: evaluation stopped there
    window_nll: tuple[float, ...] = ()  # mean NLL per predicted token of each window (of each batch of windows)

    @property
    def diverged(self) -> bool:
        return self.nonfinite_window is not None

    @property
    def tokens_per_second(self) -> float:
        return self.windows * self.seqlen / self.seconds if self.seconds > 0 else float("nan")


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
    chunk: int = 512,
    on_chunk: Callable[[int, int, torch.Tensor], None] | None = None,
) -> PerplexityResult:
    """`on_chunk(first window, first position, log-probabilities [batch, positions, vocab])` sees every chunk the
    loss is taken from (the fidelity comparison rides on this pass; `harness/evaluate/fidelity.py`); the loss is
    then nll_loss of those log-probabilities — what cross_entropy computes, done once."""
    n_windows = token_ids.shape[1] // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"text has {token_ids.shape[1]} tokens, fewer than one window of {seqlen}")
    windows = token_ids[0, : n_windows * seqlen].reshape(n_windows, seqlen)
    device = next(model.parameters()).device
    nll_sum, count, nonfinite_window, per_window = 0.0, 0, None, []
    start = time.perf_counter()
    bar = tqdm(total=n_windows, desc=f"perplexity (seqlen {seqlen})", unit="win", disable=not progress)
    for first in range(0, n_windows, batch_size):
        batch = windows[first : first + batch_size].to(device)
        targets = batch[:, 1:]
        observe = None if on_chunk is None else (lambda start, logits, first=first: on_chunk(first, start, logits))
        window_nll = float(_summed_nll(model, batch, targets, chunk, observe))
        nll_sum += window_nll
        count += targets.numel()
        per_window.append(window_nll / targets.numel())
        bar.update(batch.shape[0])
        if not math.isfinite(window_nll):  # a collapsed model: the remaining windows cannot make it finite
            nonfinite_window = first
            n_windows = first + batch.shape[0]
            break
    bar.close()
    seconds = time.perf_counter() - start
    mean_nll = nll_sum / count
    return PerplexityResult(
        ppl=math.exp(mean_nll) if math.isfinite(mean_nll) else float("nan"),
        nll=mean_nll,
        windows=n_windows,
        tokens_scored=count,
        tokens_total=int(token_ids.shape[1]),
        seqlen=seqlen,
        seconds=seconds,
        nonfinite_window=nonfinite_window,
        window_nll=tuple(per_window),
    )


def _summed_nll(model: nn.Module, batch: torch.Tensor, targets: torch.Tensor, chunk: int, observe=None) -> torch.Tensor:
    """Σ −log p(target) over the window's predicted positions, lm_head applied `chunk` positions at a time."""
    try:
        arch = arch_of(model)
    except (UnsupportedArchitecture, AttributeError):  # no adapter for the family (or no HF config at all)
        logits = model(batch, use_cache=False).logits[:, :-1, :].float()
        if observe is not None:
            observe(0, torch.log_softmax(logits, dim=-1))
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    hidden = arch.body(model)(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
    total = torch.zeros((), dtype=torch.float64, device=batch.device)
    for start in range(0, hidden.shape[1], chunk):
        logits = arch.logits(model, hidden[:, start : start + chunk]).float()
        part = targets[:, start : start + chunk]
        if observe is not None:  # the observer reads the log-probabilities the loss is taken from: computed once
            log_probs = torch.log_softmax(logits, dim=-1)
            observe(start, log_probs)
            flat = log_probs.reshape(-1, log_probs.shape[-1])
            total += nn.functional.nll_loss(flat, part.reshape(-1), reduction="sum")
            continue
        # classes on the last, contiguous dim: PyTorch's CPU cross-entropy over a strided class dim (input
        # [batch, vocab, tokens]) loses ~4e-5 relative on a 49k vocabulary
        total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), part.reshape(-1), reduction="sum")
    return total
