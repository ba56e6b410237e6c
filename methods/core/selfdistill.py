"""Self-distillation data (BitDistiller, arXiv 2402.10631 §3.2; code `data/generation/`): the full-precision
teacher completes prompts by sampling (temperature 0.7, top-p 1), and QAT trains on prompt + completion.

Prompts as the authors build them from WikiText-2: the first 128 characters of every row longer than 512
characters, `max_prompts` drawn at random (seeded). The generations are made once per (model, prompts,
generation settings, seed), cached on disk (an atomic JSON write), and reused by every later run.
Simplified, and why: the authors train on each prompt + completion padded to 1024 tokens (and mix in Alpaca
completions, which the offline mirror lacks); we concatenate the sequences, separated by EOS, and cut them into
windows of the training length, so no position is padding.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from methods.core.atomic import atomic_write
from methods.core.params import valid


@dataclass(frozen=True)
class GenerationSettings:
    max_prompts: int = valid(64, ge=1)
    prompt_chars: int = valid(128, ge=1)
    min_row_chars: int = valid(512, ge=0)
    max_new_tokens: int = valid(256, ge=1)
    temperature: float = valid(0.7, gt=0)
    top_p: float = valid(1.0, gt=0, le=1)
    batch_size: int = valid(8, ge=1)


def select_prompts(rows: list[str], settings: GenerationSettings, seed: int) -> list[str]:
    long_rows = [row for row in rows if len(row) > settings.min_row_chars]
    prompts = [row[: settings.prompt_chars] for row in long_rows]
    random.Random(seed).shuffle(prompts)
    return prompts[: settings.max_prompts]


def _cache_key(model: nn.Module, prompts: list[str], settings: GenerationSettings, seed: int) -> str:
    config = model.config.to_json_string(use_diff=False)
    blob = json.dumps({"config": config, "prompts": prompts, "settings": asdict(settings), "seed": seed})
    probe = sum(float(p.detach().double().sum()) for p in list(model.parameters())[:3])  # the weights, cheaply
    return hashlib.sha256(f"{blob}{probe:.10e}".encode()).hexdigest()[:16]


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer, prompts: list[str], settings: GenerationSettings, seed: int
) -> list[list[int]]:
    """Token ids of prompt + sampled completion, one list per prompt (generation stops at EOS or the cap)."""
    eos = tokenizer.eos_token_id
    sequences = []
    torch.manual_seed(seed)
    for start in tqdm(range(0, len(prompts), settings.batch_size), desc="teacher generation", unit="batch"):
        batch = [tokenizer(p).input_ids for p in prompts[start : start + settings.batch_size]]
        width = max(len(ids) for ids in batch)
        pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        out = model.generate(
            input_ids=input_ids.to(next(model.parameters()).device),
            attention_mask=mask.to(next(model.parameters()).device),
            do_sample=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=0,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for ids, row in zip(batch, out.tolist(), strict=True):
            completion = row[width:]
            if eos in completion:
                completion = completion[: completion.index(eos)]
            sequences.append(ids + completion)
    return sequences


def cached_generations(
    model: nn.Module, tokenizer, prompts: list[str], settings: GenerationSettings, seed: int, cache_dir: str | Path
) -> tuple[list[list[int]], bool]:
    """(sequences, whether they came from the cache)."""
    path = Path(cache_dir) / f"selfdistill-{_cache_key(model, prompts, settings, seed)}.json"
    if path.exists():
        return json.loads(path.read_text())["sequences"], True
    sequences = generate(model, tokenizer, prompts, settings, seed)
    blob = json.dumps({"settings": asdict(settings), "seed": seed, "sequences": sequences})
    atomic_write(path, lambda tmp: tmp.write_text(blob))
    return sequences, False


def pack(sequences: list[list[int]], seqlen: int, eos: int) -> torch.Tensor:
    """Concatenate the sequences (each followed by EOS) and cut [n, seqlen] windows; the tail is dropped."""
    stream = [token for seq in sequences for token in (*seq, eos)]
    n = len(stream) // seqlen
    if n == 0:
        raise ValueError(f"the teacher generated {len(stream)} tokens, fewer than one training window of {seqlen}")
    return torch.tensor(stream[: n * seqlen]).reshape(n, seqlen)
