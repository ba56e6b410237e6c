"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, on the in-memory (quantized) model.

The model and tokenizer are wrapped in lm-eval's `HFLM` (no reload, no weight copy) and scored with
`simple_evaluate(num_fewshot=0)`. Task configs are the registered ones. Offline (a mirror directory is
configured), each task's registered YAML is loaded with lm-eval's own loader (includes and `!function`
hooks resolved) and only its data source changes: `dataset_path: json` with the mirror's
`tasks/<task>/<split>.jsonl`, whose rows use the hub's field names — so prompts, targets and metrics are
lm-eval's. The mirror's HellaSwag lacks `ctx_a`/`ctx_b` (only their join `ctx`), so its offline task is
named `hellaswag_mirror` and builds the query from `activity_label + ": " + ctx` with lm-eval's own
`preprocess`: ctx_b's first letter is not capitalised, so scores are close to, not equal to, lm-eval's.

Whole splits take hours on a CPU (HellaSwag's 10,042 documents alone ~1.5 h for a 135M model), so a killed run
started again resumes where it stopped (`ScoreCache`): finished tasks' scores (with their wall time) are kept in a
JSON file, and the task in flight resumes request by request from lm-eval's own response cache (`use_cache`, a
SQLite file that HFLM writes as each request is scored). Both are used only when the model the run rebuilt is the
same one: they are named by a fingerprint of the run's exact per-window perplexity NLLs (and lm-eval's version),
and any difference starts afresh.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.data import DATA_ENV, mirror_dir

DEFAULT_TASKS = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "lambada_openai")
# The metric the papers report (QuaRot Table 6 etc.): acc_norm where the task defines it, else acc.
PAPER_METRIC = {
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "hellaswag_mirror": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
}
MIRRORED = {  # task -> the split the mirror holds (and that lm-eval evaluates)
    "piqa": "validation",
    "hellaswag": "validation",
    "arc_easy": "test",
    "arc_challenge": "test",
    "winogrande": "validation",
    "lambada_openai": "test",
    "boolq": "validation",
}


class TaskUnavailable(RuntimeError):
    """A task that is neither mirrored nor reachable; the message names both fixes."""


@dataclass(frozen=True)
class TaskScore:
    task: str  # the name reported (hellaswag_mirror when offline)
    metric: str
    value: float
    stderr: float | None
    all_metrics: dict[str, float]
    config_hash: str
    seconds: float
    documents: tuple[int, ...] = ()  # the scored documents' indices in the task's evaluation split
    correct: tuple[int, ...] = ()  # per document (same order): 1 where `metric` scored it right


def _hellaswag_mirror_docs(dataset):
    """HellaSwag query/choices/gold from the mirror's joined `ctx` (see module doc), lm-eval's preprocess."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    def process(doc):
        return {
            "query": preprocess(doc["activity_label"] + ": " + doc["ctx"]),
            "choices": [preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(process)


@functools.lru_cache(maxsize=1)
def task_manager():
    """lm-eval's task index (building it scans every registered YAML: do it once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def registered_config(task: str) -> dict[str, Any]:
    """The registered task's full config (includes merged, `!function` hooks resolved), via lm-eval."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise TaskUnavailable(f"unknown lm-eval task {task!r}; `lm-eval ls tasks` lists the registered ones")
    return load_yaml(entry.yaml_path, resolve_func=True)


def mirror_config(task: str, mirror: Path) -> dict[str, Any]:
    """The registered config with only the data source moved to the mirror (and hellaswag renamed)."""
    if task not in MIRRORED:
        raise TaskUnavailable(
            f"task {task!r} is not in the data mirror ({', '.join(MIRRORED)} are): unset {DATA_ENV} to load it "
            f"from the Hugging Face hub, or add tasks/{task}/<split>.jsonl to the mirror"
        )
    split = MIRRORED[task]
    path = mirror / "tasks" / task / f"{split}.jsonl"
    if not path.exists():
        raise TaskUnavailable(f"{path} missing: fix the mirror ({DATA_ENV}) or unset it to use the hub")
    cfg = registered_config(task)
    cfg.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(path)}},
        training_split=None,
        fewshot_split=None,
    )
    for key in ("validation_split", "test_split"):
        if cfg.get(key) not in (None, split):
            cfg[key] = None
    for key in ("tag", "group"):
        cfg.pop(key, None)
    if task == "hellaswag":
        cfg.update(task="hellaswag_mirror", process_docs=_hellaswag_mirror_docs)
    return cfg


def check_tasks(tasks: list[str], data_dir: str | None) -> None:
    """Refuse unknown or unavailable task names at planning time (before any model loads): with a mirror, the
    mirrored task files; without one, lm-eval's task index."""
    mirror = mirror_dir(data_dir)
    for task in tasks:
        if mirror is None:
            if task not in task_manager().task_index:
                raise TaskUnavailable(f"unknown lm-eval task {task!r}; `lm-eval ls tasks` lists the registered ones")
            continue
        if task not in MIRRORED:
            raise TaskUnavailable(
                f"unknown zero-shot task {task!r}: the data mirror has {', '.join(MIRRORED)} "
                f"(unset {DATA_ENV} to use any lm-eval task from the hub)"
            )
        path = mirror / "tasks" / task / f"{MIRRORED[task]}.jsonl"
        if not path.exists():
            raise TaskUnavailable(f"{path} missing: fix the mirror ({DATA_ENV}) or unset it to use the hub")


def task_specs(tasks: list[str], data_dir: str | None) -> list[str | dict[str, Any]]:
    mirror = mirror_dir(data_dir)
    if mirror is None:
        return list(tasks)
    return [mirror_config(task, mirror) for task in tasks]


def config_hash(task_config: dict[str, Any]) -> str:
    """sha256 of the task's resolved config (functions by qualified name): identifies what was evaluated."""

    def default(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"

    blob = json.dumps(task_config, sort_keys=True, default=default)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sampled_documents(total: int, sample: int, seed: int) -> list[int] | None:
    """`sample` document indices of a split of `total`, drawn without replacement from a generator seeded with
    `seed` and sorted; None (the whole split) where the split is not larger. Depends on nothing but its arguments,
    so every run scores the same documents."""
    import torch

    if total <= sample:
        return None
    drawn = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:sample]
    return sorted(drawn.tolist())


def _task_size(spec) -> tuple[str, int]:
    """(lm-eval's name of the task, its number of evaluation documents)."""
    loaded = task_manager().load([spec])
    tasks = loaded.get("tasks", loaded) if isinstance(loaded, dict) else loaded
    name, task = next(iter(tasks.items()))
    return name, len(task.eval_docs)


def evaluate_zeroshot(
    model,
    tokenizer,
    tasks: list[str],
    data_dir: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    bootstrap_iters: int = 1000,
    cache: ScoreCache | None = None,
    sample: int | None = None,
    sample_seed: int = 0,
    scorer: type | None = None,
) -> list[TaskScore]:
    """Score `tasks` zero-shot on the in-memory model; one TaskScore per task, in the given order, with each
    scored document's index and whether the task's metric counted it right. `limit`: the first documents of each
    task; `sample`: a seeded subset (`sampled_documents`). With a `cache`, tasks it holds are not evaluated again,
    each new score is saved as its task ends, and the task in flight is resumed from the cached responses (its
    `seconds` include the earlier attempts' time on it). `scorer`: the lm-eval model class (default: the one
    `shared_prefix.scorer_for` picks for this model)."""
    import lm_eval

    from harness.evaluate.shared_prefix import scorer_for

    specs = task_specs(tasks, data_dir)
    scorer = scorer or scorer_for(model)[0]
    lm = scorer(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=2048)
    scores = []
    done = cache.load() if cache is not None else {}
    for task, spec in zip(tasks, specs, strict=True):
        if task in done:
            scores.append(done[task])
            continue
        carried = cache.start(task) if cache is not None else 0.0
        start = time.perf_counter()
        try:
            subset = None
            if sample is not None:
                name, total = _task_size(spec)
                documents = sampled_documents(total, sample, sample_seed)
                subset = None if documents is None else {name: documents}
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[spec],
                num_fewshot=0,
                limit=limit,
                samples=subset,
                bootstrap_iters=bootstrap_iters,
                log_samples=True,
                task_manager=task_manager(),
                use_cache=None if cache is None else str(cache.request_prefix),
            )
        except (ConnectionError, OSError) as err:
            raise TaskUnavailable(
                f"task {task!r} could not be loaded ({type(err).__name__}): set {DATA_ENV}=/path/to/data-mirror "
                f"(tasks/{task}/<split>.jsonl) or give this machine access to the Hugging Face hub"
            ) from err
        seconds = carried + time.perf_counter() - start
        name, result = next(iter(out["results"].items()))
        metrics = {
            k.split(",")[0]: float(v)
            for k, v in result.items()
            if isinstance(v, (int, float)) and not k.startswith("alias")
        }
        metric = PAPER_METRIC.get(name, "acc")
        scored = sorted(out["samples"][name], key=lambda doc: doc["doc_id"])
        task_config = out["configs"][name]
        score = TaskScore(
            task=name,
            metric=metric,
            value=metrics[metric],
            stderr=metrics.get(f"{metric}_stderr"),
            all_metrics=metrics,
            config_hash=config_hash(task_config),
            seconds=seconds,
            documents=tuple(int(doc["doc_id"]) for doc in scored),
            correct=tuple(int(float(doc[metric]) > 0) for doc in scored),
        )
        scores.append(score)
        if cache is not None:
            cache.save(task, score)
    return scores


def _task_score(fields: dict) -> TaskScore:
    """A TaskScore from its JSON fields (lists back to tuples; entries saved before per-document outcomes were
    kept have none)."""
    per_document = {name: tuple(fields.get(name, ())) for name in ("documents", "correct")}
    return TaskScore(**{**fields, **per_document})


def model_fingerprint(run_key: str, window_nll) -> str:
    """Identifies the evaluated model by what it computed: the run key, lm-eval's version and the exact (bit for
    bit) NLL of every perplexity window. A re-quantized model that differs anywhere that matters differs here."""
    from importlib.metadata import version

    blob = json.dumps([run_key, version("lm_eval"), [float(x).hex() for x in window_nll]])
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class ScoreCache:
    """One run's zero-shot progress in `directory`: `<run_key>.json` (the fingerprint, finished tasks' TaskScore
    fields, the task in flight with its start time) and lm-eval's response cache `<run_key>-<fingerprint>_rank0.db`.
    """

    directory: Path
    run_key: str
    fingerprint: str

    @property
    def path(self) -> Path:
        return self.directory / f"{self.run_key}.json"

    @property
    def request_prefix(self) -> Path:
        """What lm-eval's `use_cache` takes (it appends `_rank<r>.db`)."""
        return self.directory / f"{self.run_key}-{self.fingerprint[:16]}"

    def _read(self) -> dict:
        try:
            kept = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return kept if kept.get("fingerprint") == self.fingerprint else {}

    def _write(self, kept: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps({**kept, "fingerprint": self.fingerprint}, indent=1))
        partial.replace(self.path)  # atomic: a kill mid-write leaves the previous file

    def load(self) -> dict[str, TaskScore]:
        """The finished tasks kept for this fingerprint; {} when there are none or they belong to another model."""
        return {task: _task_score(fields) for task, fields in self._read().get("scores", {}).items()}

    def start(self, task: str) -> float:
        """Mark `task` in flight; return the seconds earlier attempts spent on it (each from its start to the
        response cache's last write), 0 for a fresh task."""
        kept = self._read()
        carried = 0.0
        previous = kept.get("in_flight")
        if previous and previous["task"] == task:
            databases = list(self.directory.glob(f"{self.request_prefix.name}_rank*.db"))
            last_write = max((db.stat().st_mtime for db in databases), default=previous["started_at"])
            carried = previous["carried"] + max(0.0, last_write - previous["started_at"])
        self._write({**kept, "in_flight": {"task": task, "started_at": time.time(), "carried": carried}})
        return carried

    def save(self, task: str, score: TaskScore) -> None:
        kept = self._read()
        scores = {**kept.get("scores", {}), task: asdict(score)}
        self._write({"scores": scores})

    def clear(self) -> None:
        """Remove the run's progress (its scores are recorded), for every fingerprint."""
        self.path.unlink(missing_ok=True)
        for leftover in self.directory.glob(f"{self.run_key}-*"):
            leftover.unlink()
