"""Fidelity to the FP model beyond perplexity: mean KL(P_FP ‖ P_quantized) of the next-token distributions and
top-1 agreement with FP, over the evaluated windows, computed in the same pass as perplexity (issue 19 item 3).

The FP side is a cached reference per model and protocol (`reference_path`): for every predicted position its
`k` most probable tokens and their log-probabilities (fp16), written by the FP run's own evaluation or, the
first time a quantized run needs it, by one FP pass before quantizing. The KL is taken over the coarsened
distribution {FP's top-k tokens, everything else}: Σ_top p·log(p/q) + p_rest·log(p_rest/q_rest) — by the
data-processing inequality a lower bound on the full KL, exact when FP's top-k holds all its mass (k = 32 by
default: 58 MB per whole WikiText-2 split of SmolLM2). Top-1 agreement is exact (FP's argmax is stored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

TOP_K = 32


def top_k_log_probs(log_probs: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids int32, log-probabilities fp16) of the k most probable tokens, sorted, per position."""
    values, ids = log_probs.float().topk(k, dim=-1)
    return ids.to(torch.int32), values.to(torch.float16)


def coarse_kl(log_q: torch.Tensor, ids: torch.Tensor, log_p_top: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) per position over {P's top-k tokens, the rest}; log_q [..., vocab] (log-softmax of the
    quantized model), ids / log_p_top [..., k] from the reference."""
    log_p = log_p_top.float()
    log_q_top = log_q.gather(-1, ids.long())
    top = (log_p.exp() * (log_p - log_q_top)).sum(-1)
    p_rest = (1 - log_p.exp().sum(-1)).clamp(min=0)
    q_rest = (1 - log_q_top.exp().sum(-1)).clamp(min=1e-12)
    rest = torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp(min=1e-12)) - torch.log(q_rest)), 0.0)
    return top + rest


@dataclass
class Reference:
    """FP top-k per evaluated window: ids int32 / log_probs fp16 [windows, seqlen − 1, k]."""

    ids: torch.Tensor
    log_probs: torch.Tensor

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        from methods.core.atomic import atomic_write

        tensors = {"ids": self.ids.contiguous(), "log_probs": self.log_probs.contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))

    @classmethod
    def load(cls, path: Path) -> Reference | None:
        if not path.exists():
            return None
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        return cls(tensors["ids"], tensors["log_probs"])


@dataclass
class Recorder:
    """`perplexity(on_chunk=…)` observer that builds the reference from the FP model's logits."""

    windows: int
    positions: int
    k: int = TOP_K
    path: Path | None = None  # where the reference goes once recorded
    ids: torch.Tensor = field(init=False)
    log_probs: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.ids = torch.zeros(self.windows, self.positions, self.k, dtype=torch.int32)
        self.log_probs = torch.zeros(self.windows, self.positions, self.k, dtype=torch.float16)

    def __call__(self, window: int, start: int, log_q: torch.Tensor) -> None:
        """log_q: log-probabilities [batch, positions, vocab] (perplexity's on_chunk)."""
        ids, log_probs = top_k_log_probs(log_q, self.k)
        self.ids[window : window + log_q.shape[0], start : start + log_q.shape[1]] = ids.cpu()
        self.log_probs[window : window + log_q.shape[0], start : start + log_q.shape[1]] = log_probs.cpu()

    def reference(self) -> Reference:
        return Reference(self.ids, self.log_probs)


@dataclass
class Comparer:
    """`perplexity(on_chunk=…)` observer summing the coarse KL and top-1 agreement against a reference."""

    reference: Reference
    kl_sum: float = 0.0
    agree: int = 0
    count: int = 0

    def __call__(self, window: int, start: int, log_q: torch.Tensor) -> None:
        """log_q: the run's log-probabilities [batch, positions, vocab] (perplexity's on_chunk)."""
        end = start + log_q.shape[1]
        ids = self.reference.ids[window : window + log_q.shape[0], start:end].to(log_q.device)
        log_p = self.reference.log_probs[window : window + log_q.shape[0], start:end].to(log_q.device)
        self.kl_sum += float(coarse_kl(log_q, ids, log_p).double().sum())
        self.agree += int((log_q.argmax(-1) == ids[..., 0].long()).sum())
        self.count += ids.shape[0] * ids.shape[1]

    def metrics(self) -> dict[str, float]:
        return {"kl_vs_fp": self.kl_sum / self.count, "top1_vs_fp": self.agree / self.count} if self.count else {}


def reference_path(cache_dir: Path, model_label: str, dataset: str, seqlen: int, windows: int, dtype: str) -> Path:
    """One reference per model and protocol (dataset, window length and count, evaluation dtype) and k."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_label)
    return cache_dir / "fp_reference" / f"{safe}-{dataset}-s{seqlen}-w{windows}-{dtype}-k{TOP_K}.safetensors"
