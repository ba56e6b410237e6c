"""`python -m harness bench zeroshot`: lm-eval's default scoring path against shared-prefix scoring
(harness/evaluate/shared_prefix.py) on the same task documents, in one process: forward token positions (padding
included, and the requests' own tokens), wall time, the largest per-request log-likelihood difference, and the
task metric of each."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from harness.evaluate.shared_prefix import ForwardCountingLM, SharedPrefixLM
from harness.evaluate.zeroshot import PAPER_METRIC, task_manager, task_specs


@dataclass(frozen=True)
class ScoringPass:
    name: str
    seconds: float
    forward_tokens: int  # token positions the model computed, padding included
    real_tokens: int | None  # positions holding a request's token (shared prefix only)
    metric: str
    value: float
    responses: list[tuple[float, bool]]  # per request, in lm-eval's (doc, choice) order


def scoring_pass(lm, name: str, task: str, data_dir: str | None, limit: int | None) -> ScoringPass:
    import lm_eval

    (spec,) = task_specs(["hellaswag" if task == "hellaswag_mirror" else task], data_dir)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[spec],
        num_fewshot=0,
        limit=limit,
        bootstrap_iters=0,
        log_samples=True,
        task_manager=task_manager(),
    )
    seconds = time.perf_counter() - start
    task_name, result = next(iter(out["results"].items()))
    metric = PAPER_METRIC.get(task_name, "acc")
    samples = sorted(out["samples"][task_name], key=lambda doc: doc["doc_id"])
    responses = [(float(resp[0][0]), bool(resp[0][1])) for doc in samples for resp in doc["resps"]]
    return ScoringPass(
        name,
        seconds,
        lm.forward_tokens,
        getattr(lm, "real_tokens", None),
        metric,
        float(result[f"{metric},none"]),
        responses,
    )


def compare_scoring(model, tokenizer, task: str, data_dir: str | None, limit: int | None, batch_size: int = 8):
    """Both passes over the first `limit` documents of `task`, lm-eval's default path first (each starts from
    a fresh wrapper: no response cache)."""
    passes = []
    for cls, name in ((ForwardCountingLM, "lm-eval default"), (SharedPrefixLM, "shared prefix")):
        lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=2048)
        with torch.inference_mode():
            passes.append(scoring_pass(lm, name, task, data_dir, limit))
    return passes


def max_abs_difference(a: ScoringPass, b: ScoringPass) -> tuple[float, int]:
    """The largest per-request |Δ log-likelihood| and the number of greedy flags that differ."""
    assert len(a.responses) == len(b.responses), "both passes score the same requests"
    worst = max(abs(x[0] - y[0]) for x, y in zip(a.responses, b.responses, strict=True))
    flips = sum(x[1] != y[1] for x, y in zip(a.responses, b.responses, strict=True))
    return worst, flips


def print_comparison(model_name: str, task: str, limit: int, batch_size: int) -> int:
    from harness import models
    from harness.data import mirror_dir
    from harness.spec import ModelSpec

    model, tokenizer = models.load(ModelSpec(model_name))
    default, shared = compare_scoring(
        model, tokenizer, task, str(mirror_dir()) if mirror_dir() else None, limit, batch_size
    )
    worst, flips = max_abs_difference(default, shared)
    print(
        f"{model_name}, {task}, first {limit} documents ({len(default.responses)} requests), batch {batch_size}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| path | forward tokens (padding included) | of them padding | wall s | " + default.metric + " |")
    print("|---|---:|---:|---:|---:|")
    for p in (default, shared):
        padding = "–" if p.real_tokens is None else f"{p.forward_tokens - p.real_tokens:,}"
        print(f"| {p.name} | {p.forward_tokens:,} | {padding} | {p.seconds:.1f} | {p.value:.4f} |")
    print(
        f"forward tokens {default.forward_tokens / shared.forward_tokens:.2f}x fewer, "
        f"{default.seconds / shared.seconds:.2f}x faster; largest |Δ log-likelihood| {worst:.2e}, "
        f"{flips} greedy flags differ"
    )
    return 0
