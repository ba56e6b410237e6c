"""Shared-prefix scoring of lm-eval's log-likelihood requests (issue 47, item 1).

lm-eval's `HFLM` scores every (context, continuation) pair of a multiple-choice document as a sequence of its own,
so a HellaSwag context goes through the model four times. `SharedPrefixLM` keeps lm-eval's requests, prompts,
tokenization (`_encode_pair`), metrics and response cache, and changes only how forward passes are built: the
requests of one context become one packed row — the context's tokens once, then each continuation's tokens but its
last — with a block attention mask (each continuation sees the context and its own earlier tokens, nothing of the
other continuations) and position ids that restart after the context for every continuation. Row by row that is
the computation the default path does for each pair, so each request's log-likelihood and greedy flag are
lm-eval's up to float rounding (tests/test_shared_prefix.py: ≤ 1e-5 absolute). Rows are sorted by length and
batched, so right padding stays small; padding positions attend only to themselves.

The equality needs a model whose output at a token depends only on the tokens its mask lets it see:
`token_local(model)` — no KV-cache or activation quantizer that takes statistics over the sequence (KVQuant's
per-channel keys, AKVQ-VL's attention-chosen pivot tokens, LO-BCQ's encoders are not assumed to be). Other models
are scored by lm-eval's default path (`scorer_for`), and the run's record says which one scored it.

What stays on lm-eval's default path: requests whose context and continuation exceed the window (lm-eval
truncates them from the left), and any packed row that would be longer than the window or than the model's
sliding-attention window (Gemma 3: the block mask replaces the sliding one, so rows stay inside it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from torch import nn

from methods.core.attention import STATE_ATTRIBUTE
from methods.core.quantizers import DynamicQuantizer

Request = tuple[tuple[str, str] | None, list[int], list[int]]


@dataclass
class PackedRow:
    """One context and the distinct continuations scored after it; `requests[i]` lists the indices (into the
    request list) that asked for `continuations[i]`."""

    context: tuple[int, ...]
    continuations: list[tuple[int, ...]] = field(default_factory=list)
    requests: list[list[int]] = field(default_factory=list)

    def length_with(self, continuation: Sequence[int]) -> int:
        return len(self) + len(continuation) - 1

    def __len__(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def pack_requests(requests: Sequence[Request], max_tokens: int) -> tuple[list[PackedRow], list[int]]:
    """Group requests by context tokens into rows of at most `max_tokens` (a context with more continuations
    than fit is split over several rows); identical (context, continuation) pairs share one slot. Returns the
    rows, longest first, and the indices of the requests left to lm-eval's default path (too long to pack)."""
    rows_by_context: dict[tuple[int, ...], list[PackedRow]] = {}
    fallback = []
    for index, (_, context, continuation) in enumerate(requests):
        context, continuation = tuple(context), tuple(continuation)
        if not context or not continuation or len(context) + len(continuation) - 1 > max_tokens:
            fallback.append(index)
            continue
        rows = rows_by_context.setdefault(context, [])
        slot = next(
            ((row, row.continuations.index(continuation)) for row in rows if continuation in row.continuations), None
        )
        if slot is not None:
            slot[0].requests[slot[1]].append(index)
            continue
        row = next((row for row in rows if row.length_with(continuation) <= max_tokens), None)
        if row is None:
            row = PackedRow(context)
            rows.append(row)
        row.continuations.append(continuation)
        row.requests.append([index])
    rows = [row for group in rows_by_context.values() for row in group]
    rows.sort(key=lambda row: (-len(row), row.context))
    return rows, fallback


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # [batch, length]
    position_ids: torch.Tensor  # [batch, length]
    allowed: torch.Tensor  # [batch, 1, length, length] bool: query i may attend to key j
    targets: list[list[tuple[list[int], tuple[int, ...]]]]  # per row, per continuation: (positions, tokens)


def build_batch(rows: Sequence[PackedRow], pad_id: int) -> PackedBatch:
    """The padded tensors of `rows` and, per continuation, the positions whose logits predict its tokens: the
    context's last position for its first token, then the positions of its own tokens but the last."""
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    segment = torch.full((len(rows), length), -1, dtype=torch.long)  # 0 = context, k = continuation k, -1 = pad
    targets = []
    for b, row in enumerate(rows):
        n_context = len(row.context)
        input_ids[b, :n_context] = torch.tensor(row.context)
        position_ids[b, :n_context] = torch.arange(n_context)
        segment[b, :n_context] = 0
        start, row_targets = n_context, []
        for k, continuation in enumerate(row.continuations, start=1):
            fed = continuation[:-1]
            stop = start + len(fed)
            if fed:
                input_ids[b, start:stop] = torch.tensor(fed)
                position_ids[b, start:stop] = torch.arange(n_context, n_context + len(fed))
                segment[b, start:stop] = k
            row_targets.append(([n_context - 1, *range(start, stop)], continuation))
            start = stop
        position_ids[b, start:] = torch.arange(length - start) + (position_ids[b, start - 1] + 1)
        targets.append(row_targets)
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    visible = (key == 0) | (key == query)
    allowed = causal & visible & (query >= 0)
    allowed |= torch.eye(length, dtype=torch.bool)  # padding attends to itself only (no empty softmax row)
    return PackedBatch(input_ids, position_ids, allowed[:, None], targets)


def _is_token_local_quantizer(quantizer) -> bool:
    """None, or the dynamic quantizer: its statistics (and groups) run along the last dim of one token."""
    return quantizer is None or isinstance(quantizer, DynamicQuantizer)


def token_local(model: nn.Module) -> bool:
    """Whether every quantizer attached to `model` works token by token: activation and KV quantizers are the
    dynamic per-token ones (statistics over the last dim of one token) or none, and no attention observer
    (AKVQ-VL's pivot selection) looks across tokens. Weight formats and online rotations act per token."""
    for module in model.modules():
        state = getattr(module, STATE_ATTRIBUTE, None)
        if state is not None:
            if state.observe_qk is not None:
                return False
            if not (_is_token_local_quantizer(state.key_quant) and _is_token_local_quantizer(state.value_quant)):
                return False
        if hasattr(module, "act_quant") and not _is_token_local_quantizer(module.act_quant):
            return False
    return True


class SharedPrefixLM(HFLM):
    """lm-eval's HFLM whose log-likelihood requests are scored one packed row per context (module docstring).
    `forward_tokens` counts the token positions the model computed (padding included), `real_tokens` those
    holding a request's token; `ForwardCountingLM` counts the first for lm-eval's default path."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forward_tokens = 0
        self.real_tokens = 0

    def _row_limit(self) -> int:
        sliding = getattr(self.model.config, "sliding_window", None)
        return min(self.max_length, sliding) if sliding else self.max_length

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        rows, fallback = pack_requests(requests, self._row_limit())
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        if fallback:
            fallen = super()._loglikelihood_tokens([requests[i] for i in fallback], disable_tqdm, override_bs)
            for index, answer in zip(fallback, fallen, strict=True):
                answers[index] = answer
        batch_size = int(self.batch_size) if str(self.batch_size).isdigit() else 8
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for first in range(0, len(rows), batch_size):
            chunk = rows[first : first + batch_size]
            batch = build_batch(chunk, pad_id)
            logits = self._packed_call(batch)
            self.forward_tokens += batch.input_ids.numel()
            self.real_tokens += sum(len(row) for row in chunk)
            for row, row_logits, row_targets in zip(chunk, logits, batch.targets, strict=True):
                for indices, (positions, tokens) in zip(row.requests, row_targets, strict=True):
                    logprobs = F.log_softmax(row_logits[positions], dim=-1, dtype=self.softmax_dtype)
                    wanted = torch.tensor(tokens, dtype=torch.long, device=logprobs.device)
                    answer = (
                        float(logprobs.gather(1, wanted[:, None]).sum()),
                        bool((logprobs.argmax(dim=-1) == wanted).all()),
                    )
                    for index in indices:
                        answers[index] = answer
                        if requests[index][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
        return answers

    def _packed_call(self, batch: PackedBatch) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(batch.allowed.shape, dtype=dtype)
        mask.masked_fill_(~batch.allowed, torch.finfo(dtype).min)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            return self.model(
                input_ids=batch.input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=batch.position_ids.to(self.device),
                use_cache=False,
            ).logits


class ForwardCountingLM(HFLM):
    """lm-eval's default path, counting the token positions it computes (`bench zeroshot`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forward_tokens = 0

    def _model_call(self, inps, attn_mask=None, labels=None):
        self.forward_tokens += inps.numel()
        return super()._model_call(inps, attn_mask, labels)


def scorer_for(model: nn.Module) -> tuple[type[HFLM], str]:
    """The lm-eval model class that scores `model`, and its name for the record (`zs.scoring`)."""
    if token_local(model):
        return SharedPrefixLM, "shared-prefix"
    return HFLM, "lm-eval"
