"""Training losses for quantization-aware training, computed over the sequence in chunks of positions.

The model's body gives the final hidden states once; each chunk of positions then goes through lm_head, its loss
is taken, and under `torch.utils.checkpoint` only the chunk's hidden states are kept for the backward pass (its
logits are recomputed there). So no step ever holds a [tokens × vocabulary] tensor for the whole sequence —
what makes a 49k (SmolLM2) or 262k (Gemma 3) vocabulary affordable on CPU.

Losses (per predicted token, averaged over the tokens whose target is not `IGNORE`):
* `cross_entropy` — next-token cross-entropy (ParetoQ trains with it alone).
* `distillation` with `kind`:
  - "forward": KL(P_T ‖ P_S) = Σ p_T (log p_T − log p_S);
  - "reverse": KL(P_S ‖ P_T);
  - "cakld": BitDistiller's confidence-aware KL (arXiv 2402.10631 §3.2), γ·KL(P_S ‖ P_T) + (1 − γ)·KL(P_T ‖ P_S)
    with γ the teacher's mean token confidence (`teacher_confidence`).
  The teacher is another model (the frozen FP one); its logits are computed per chunk without gradients.
Reduction: the mean over scored tokens (so the loss scale does not depend on sequence length). BitDistiller's
code sums over positions and averages over sequences (`reduction="sequence_sum"`): the same gradient direction,
scaled by the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from methods.core.arch import arch_of
from methods.core.cpu_gemm import checkpoint_contexts

IGNORE = -100
KL_KINDS = ("forward", "reverse", "cakld")


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states [batch, tokens, hidden] (after the final norm, before lm_head)."""
    return arch_of(model).body(model)(input_ids=input_ids, use_cache=False).last_hidden_state


def _chunks(tokens: int, chunk: int):
    for start in range(0, tokens, chunk):
        yield slice(start, min(start + chunk, tokens))


def _token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, gamma: float) -> torch.Tensor:
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    forward = (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind == "forward":
        return forward
    reverse = (log_s.exp() * (log_s - log_t)).sum(-1)
    return reverse if kind == "reverse" else gamma * reverse + (1 - gamma) * forward


def _reduce(per_token_sum: torch.Tensor, counts: torch.Tensor, reduction: str) -> torch.Tensor:
    """per_token_sum: [batch] summed losses; counts: [batch] scored tokens."""
    if reduction == "token_mean":
        return per_token_sum.sum() / counts.sum().clamp(min=1)
    if reduction == "sequence_sum":
        return per_token_sum.mean()
    raise ValueError(f"reduction must be 'token_mean' or 'sequence_sum', got {reduction!r}")


@dataclass(frozen=True)
class LossSettings:
    chunk: int = 256  # positions per lm_head chunk
    reduction: str = "token_mean"


def cross_entropy(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    settings: LossSettings = LossSettings(),
) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t + 1] (labels = input_ids unless given)."""
    labels = input_ids if labels is None else labels
    hidden = final_hidden(model, input_ids)[:, :-1]
    targets = labels[:, 1:]
    arch = arch_of(model)

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = arch.logits(model, h).float()  # classes last and contiguous (a strided class dim is less exact)
        flat = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE, reduction="none"
        )
        return flat.reshape(y.shape).sum(-1)

    total = sum(
        checkpoint(chunk_loss, hidden[:, part], targets[:, part], use_reentrant=False, context_fn=checkpoint_contexts)
        for part in _chunks(hidden.shape[1], settings.chunk)
    )
    return _reduce(total, (targets != IGNORE).sum(-1), settings.reduction)


def distillation(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    kind: str = "cakld",
    gamma: float = 0.5,
    labels: torch.Tensor | None = None,
    settings: LossSettings = LossSettings(),
) -> torch.Tensor:
    """KL between the teacher's and the student's next-token distributions at every scored position
    (positions whose label is `IGNORE` — padding — are left out)."""
    if kind not in KL_KINDS:
        raise ValueError(f"distillation kind must be one of {', '.join(KL_KINDS)}, got {kind!r}")
    labels = input_ids if labels is None else labels
    scored = labels != IGNORE
    with torch.no_grad():
        teacher_hidden = final_hidden(teacher, input_ids)
    student_hidden = final_hidden(student, input_ids)
    s_arch, t_arch = arch_of(student), arch_of(teacher)

    def chunk_loss(h: torch.Tensor, h_teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = t_arch.logits(teacher, h_teacher)
        return (_token_kl(s_arch.logits(student, h), teacher_logits, kind, gamma) * mask).sum(-1)

    total = sum(
        checkpoint(
            chunk_loss,
            student_hidden[:, part],
            teacher_hidden[:, part],
            scored[:, part],
            use_reentrant=False,
            context_fn=checkpoint_contexts,
        )
        for part in _chunks(input_ids.shape[1], settings.chunk)
    )
    return _reduce(total, scored.sum(-1), settings.reduction)


@dataclass(frozen=True)
class TeacherConfidence:
    gamma: float  # mean over scored tokens of the teacher's top-1 probability (the paper's γ)
    gamma_reference_code: float  # BitDistiller's code: n + 1 batch means (padding included) divided by n


@torch.no_grad()
def teacher_confidence(
    teacher: nn.Module, batches: list[torch.Tensor], labels: list[torch.Tensor] | None = None, chunk: int = 256
) -> TeacherConfidence:
    """γ for CAKLD over `batches` (each [batch, tokens]). The authors' code loops while step ≤ n (so it reads
    n + 1 batches), averages each batch's max-probability over every position, padding included, and divides the
    sum by n; we report that too, for comparison, and use the mean over the tokens actually scored."""
    arch = arch_of(teacher)
    top_sum, top_count, batch_means = 0.0, 0, []
    for index, ids in enumerate(batches):
        scored = (ids if labels is None else labels[index]) != IGNORE
        hidden = final_hidden(teacher, ids)
        tops = torch.cat(
            [F.softmax(arch.logits(teacher, hidden[:, p]).float(), -1).amax(-1) for p in _chunks(ids.shape[1], chunk)],
            dim=1,
        )
        top_sum += float(tops[scored].sum())
        top_count += int(scored.sum())
        batch_means.append(float(tops.mean()))
    n = max(len(batches) - 1, 1)  # the reference reads n + 1 batches for n steps
    return TeacherConfidence(gamma=top_sum / max(top_count, 1), gamma_reference_code=sum(batch_means) / n)
