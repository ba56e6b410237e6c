"""Contamination guard: how much of the evaluation split a run's calibration or training text already contains.

The measure is the one GPT-3 used for its benchmark-contamination study (Brown et al. 2020, App. C): the text
lowercased, reduced to words (runs of letters and digits, punctuation dropped), and cut into 13-grams; we report
the fraction of the evaluation split's distinct 13-grams that also occur in the source corpus. WikiText-2's
validation split is disjoint from its test split (different articles), so a calibration/training corpus should
share almost none of them; above `WARN_FRACTION` the run is tagged and the leaderboard says so.

The source is the whole corpus a run draws its windows from (an upper bound on what the drawn windows saw):
the figure is a property of (corpus, evaluation split), computed once per process and logged with every run.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from harness import data

NGRAM = 13
WARN_FRACTION = 0.01
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Overlap:
    eval_ngrams: int  # distinct n-grams of the evaluation split
    shared: int  # of those, how many occur in the source text

    @property
    def fraction(self) -> float:
        return self.shared / self.eval_ngrams if self.eval_ngrams else 0.0


def ngrams(text: str, n: int = NGRAM) -> set[str]:
    words = _WORD.findall(text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def overlap(source_text: str, eval_text: str, n: int = NGRAM) -> Overlap:
    evaluated = ngrams(eval_text, n)
    return Overlap(len(evaluated), len(evaluated & ngrams(source_text, n)))


@functools.lru_cache(maxsize=16)
def corpus_overlap(corpus: str, eval_dataset: str, data_dir: str | None) -> Overlap:
    """Overlap of a calibration corpus (`data.CALIB_DATASETS`) with an evaluation split (`data.PPL_DATASETS`)."""
    if eval_dataset not in data.PPL_DATASETS:
        raise ValueError(f"unknown evaluation dataset {eval_dataset!r}; valid: {', '.join(data.PPL_DATASETS)}")
    return overlap(data.calibration_text(corpus, data_dir), "\n\n".join(data.wikitext2_rows("test", data_dir)))


def run_metrics(sources: dict[str, str], eval_dataset: str, data_dir: str | None) -> tuple[dict, dict]:
    """Metrics `contamination.<role>_13gram` (fraction) for each role ('calib', 'train') -> corpus the run read,
    and a warning tag for any above WARN_FRACTION."""
    metrics, tags = {}, {}
    for role, corpus in sources.items():
        found = corpus_overlap(corpus, eval_dataset, data_dir)
        metrics[f"contamination.{role}_{NGRAM}gram"] = found.fraction
        if found.fraction > WARN_FRACTION:
            tags[f"contamination.{role}_warning"] = (
                f"{100 * found.fraction:.2f}% of the {eval_dataset} test split's {NGRAM}-grams occur in {corpus}"
            )
    return metrics, tags
