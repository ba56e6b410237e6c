"""Cross-check (issue: SignRound via auto-round): our perplexity evaluator against auto-round's own
in-memory evaluation (`auto_round.eval.evaluation.simple_evaluate_user_model`, i.e. lm-eval's HFLM) on
the same windows, both in the models' own dtype.

lm-eval scores a document with `loglikelihood_rolling`: its first window feeds [prefix] + d[:-1] and
predicts every token of d, where prefix is the tokenizer's BOS (else EOS). Our evaluator predicts tokens
1..L−1 of each window from the preceding ones. So each window is built as [prefix] + d with |d| = L − 1
test tokens: both evaluators then condition every token of d on exactly the same context. The documents
handed to lm-eval are the decoded d; only windows whose text re-encodes to exactly d are used (a
byte-level BPE can merge differently across a cut), so both sides score identical token sequences.
lm-eval reports bits_per_byte = −Σ log p / (ln 2 · Σ bytes), from which we recover Σ log p and hence the
token-level perplexity over the same Σ|d| tokens.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.evaluate.perplexity import perplexity

TASK = "quantbench_windows"


@dataclass(frozen=True)
class CrossCheck:
    ppl_ours: float
    ppl_auto_round: float
    windows: int
    tokens: int

    @property
    def rel_diff(self) -> float:
        return abs(self.ppl_ours - self.ppl_auto_round) / self.ppl_auto_round


def prefix_token_id(tokenizer) -> int:
    """lm-eval HFLM's rolling-loglikelihood prefix: BOS if the tokenizer has one, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def round_trip_documents(token_ids: torch.Tensor, tokenizer, seqlen: int, n_windows: int) -> list[list[int]]:
    """The first `n_windows` consecutive (L − 1)-token slices whose decoded text re-encodes to themselves."""
    docs, step, token_ids = [], seqlen - 1, token_ids.flatten()
    for start in range(0, token_ids.numel() - step + 1, step):
        doc = token_ids[start : start + step].tolist()
        if tokenizer(tokenizer.decode(doc), add_special_tokens=False)["input_ids"] == doc:
            docs.append(doc)
            if len(docs) == n_windows:
                break
    if len(docs) < n_windows:
        raise ValueError(f"only {len(docs)} of the requested {n_windows} windows survive decode/encode")
    return docs


def _task_yaml(data_file: Path) -> str:
    return (
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: bits_per_byte\n"
    )


def auto_round_log_likelihood(model, tokenizer, texts: list[str]) -> float:
    """Σ log p of `texts` (natural log) from auto-round's evaluator, recovered from lm-eval's bits_per_byte."""
    from auto_round.eval.evaluation import simple_evaluate_user_model
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "windows.jsonl"
        data_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        (Path(tmp) / f"{TASK}.yaml").write_text(_task_yaml(data_file), encoding="utf-8")
        results = simple_evaluate_user_model(
            model,
            tokenizer,
            batch_size=1,
            max_batch_size=1,
            tasks=[TASK],
            task_manager=TaskManager(include_path=tmp),
        )
    bits_per_byte = results["results"][TASK]["bits_per_byte,none"]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return -bits_per_byte * math.log(2) * n_bytes


def compare(
    ours_model, auto_round_model, tokenizer, token_ids: torch.Tensor, seqlen: int, n_windows: int
) -> CrossCheck:
    """Perplexity of the same windows by our evaluator (on `ours_model`) and auto-round's (on `auto_round_model`)."""
    docs = round_trip_documents(token_ids, tokenizer, seqlen, n_windows)
    prefix = prefix_token_id(tokenizer)
    stream = torch.tensor([[tok for doc in docs for tok in [prefix, *doc]]])
    ours = perplexity(ours_model, stream, seqlen, batch_size=1)
    texts = [tokenizer.decode(doc) for doc in docs]
    log_likelihood = auto_round_log_likelihood(auto_round_model, tokenizer, texts)
    tokens = sum(len(doc) for doc in docs)
    if ours.tokens_scored != tokens:
        raise RuntimeError(f"our evaluator scored {ours.tokens_scored} tokens, the documents hold {tokens}")
    return CrossCheck(ours.ppl, math.exp(-log_likelihood / tokens), len(docs), tokens)
