"""Text corpora for perplexity and calibration, from the Hugging Face hub or a local mirror.

The mirror directory (config `data_dir` or env `QUANTBENCH_DATA`; layout of `shared/data`, see its
PROVENANCE.md) is used when given; otherwise the hub. WikiText-2 rows are rebuilt exactly as the hub's
`wikitext-2-raw-v1` gives them: a non-blank line keeps its trailing newline, a blank line is "".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from harness.spec import CalibSpec, SpecError

DATA_ENV = "QUANTBENCH_DATA"
PPL_DATASETS = ("wikitext2",)
CALIB_DATASETS = {
    # name: (description, loader)
    "wikitext2-valid": "WikiText-2 raw validation split (disjoint from test; the mirror has no train split)",
    "wikitext2-train": "WikiText-2 raw train split (GPTQ/QuaRot's choice; hub only)",
    "c4-exllamav2": "ExLlamaV2's standard C4 calibration text (118 documents; mirror only)",
}


class DataUnavailable(RuntimeError):
    """Neither the mirror nor the hub can provide the data; the message names both fixes."""


def mirror_dir(configured: str | None = None) -> Path | None:
    """The mirror as an absolute path (a relative one is taken from the working directory)."""
    value = configured or os.environ.get(DATA_ENV)
    return Path(value).expanduser().resolve() if value else None


def absolute_mirror_env() -> None:
    """Make `QUANTBENCH_DATA` absolute in this process's environment, so jobs a launcher starts in another
    working directory (joblib, submitit, a Hydra job with chdir) read the same mirror."""
    mirror = mirror_dir()
    if mirror is not None:
        os.environ[DATA_ENV] = str(mirror)


def _unavailable(what: str, detail: str) -> DataUnavailable:
    return DataUnavailable(
        f"{what} not available ({detail}): set {DATA_ENV}=/path/to/data-mirror (layout of shared/data) "
        f"or data_dir=..., or give this machine access to the Hugging Face hub"
    )


def wikitext2_rows(split: str, data_dir: str | None = None) -> list[str]:
    """Rows of WikiText-2 raw `split` ('test', 'validation', 'train') as the hub dataset has them."""
    mirror = mirror_dir(data_dir)
    if mirror is not None:
        name = {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "train": "wiki.train.raw"}[split]
        path = mirror / "wikitext-2-raw" / name
        if not path.exists():
            raise _unavailable(f"WikiText-2 {split}", f"{path} missing")
        with open(path, encoding="utf-8") as handle:
            return ["" if line.strip() == "" else line for line in handle]
    try:
        from datasets import load_dataset

        return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    except Exception as err:  # hub unreachable, offline mode, ...
        raise _unavailable(f"WikiText-2 {split}", f"hub: {type(err).__name__}") from err


def ppl_token_ids(dataset: str, tokenizer, data_dir: str | None = None) -> torch.Tensor:
    """The whole test split, rows joined with "\\n\\n", tokenized once (GPTQ/QuaRot protocol): [1, N]."""
    if dataset not in PPL_DATASETS:
        raise SpecError(f"unknown perplexity dataset {dataset!r}; valid: {', '.join(PPL_DATASETS)}")
    text = "\n\n".join(wikitext2_rows("test", data_dir))
    return tokenizer(text, return_tensors="pt").input_ids


def corpus_rows(dataset: str, data_dir: str | None = None) -> list[str]:
    """The rows (documents, or WikiText lines) of a calibration corpus."""
    if dataset == "wikitext2-valid":
        return wikitext2_rows("validation", data_dir)
    if dataset == "wikitext2-train":
        return wikitext2_rows("train", data_dir)
    if dataset == "c4-exllamav2":
        mirror = mirror_dir(data_dir)
        path = None if mirror is None else mirror / "calibration" / "exllamav2_c4.jsonl"
        if path is None or not path.exists():
            raise _unavailable("c4-exllamav2 calibration text", f"{path} missing")
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line)["text"] for line in handle]
    raise SpecError(f"unknown calibration dataset {dataset!r}; valid: {', '.join(CALIB_DATASETS)}")


def calibration_text(dataset: str, data_dir: str | None = None) -> str:
    return "\n\n".join(corpus_rows(dataset, data_dir))


def check_calib_spec(spec: CalibSpec) -> None:
    if spec.dataset not in CALIB_DATASETS:
        raise SpecError(f"unknown calibration dataset {spec.dataset!r}; valid: {', '.join(CALIB_DATASETS)}")
    if spec.nsamples <= 0 or spec.seqlen <= 1:
        raise SpecError(f"calibration needs nsamples > 0 and seqlen > 1, got {spec.nsamples} and {spec.seqlen}")


def calibration_windows(spec: CalibSpec, tokenizer, seed: int, data_dir: str | None = None) -> list[torch.Tensor]:
    """`spec.nsamples` windows of `spec.seqlen` tokens at seeded uniform random offsets (GPTQ's sampler)."""
    ids = tokenizer(calibration_text(spec.dataset, data_dir), return_tensors="pt").input_ids
    if ids.shape[1] <= spec.seqlen:
        raise SpecError(f"calibration text has {ids.shape[1]} tokens, fewer than seqlen {spec.seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.shape[1] - spec.seqlen, (spec.nsamples,), generator=generator)
    return [ids[:, int(s) : int(s) + spec.seqlen] for s in starts]


def training_windows(spec, tokenizer, seed: int, data_dir: str | None = None) -> torch.Tensor:
    """[spec.windows, spec.seqlen] token ids at seeded random offsets of a calibration corpus (never the test
    split: only `CALIB_DATASETS` are accepted), for methods that train."""
    windows = calibration_windows(CalibSpec(spec.dataset, spec.windows, spec.seqlen), tokenizer, seed + 1, data_dir)
    return torch.cat(windows, dim=0)
