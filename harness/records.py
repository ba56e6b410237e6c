"""Run records: MLflow runs exported as plain dicts, one per run key, stored in `reports/runs.jsonl`.

`report` merges what the tracking store holds into the committed records: a run key present in the store
replaces its record, every other record is kept — a fresh machine's store never erases earlier results.
"""

from __future__ import annotations

import json
from pathlib import Path

from methods.core.atomic import atomic_write

PROTOCOL_PARAMS = {
    "ppl_dataset": "eval.ppl.dataset",
    "ppl_seqlen": "eval.ppl.seqlen",
    "ppl_dtype": "eval.ppl.dtype",
    "ppl_max_windows": "budget.ppl_max_windows",
    "calib_dataset": "calib.dataset",
    "calib_nsamples": "calib.nsamples",
    "calib_seqlen": "calib.seqlen",
    "budget": "budget.name",
    "seed": "seed",
    "zs_tasks": "eval.zeroshot.tasks",
    "zs_limit": "eval.zeroshot.limit",
    "zs_sample": "eval.zeroshot.sample",
    "zs_sample_seed": "eval.zeroshot.sample_seed",
}
# runs logged before zero-shot (or its seeded document subset) existed
PROTOCOL_DEFAULTS = {"zs_tasks": "[]", "zs_limit": "null", "zs_sample": "null", "zs_sample_seed": "0"}


def _plugin_params(params: dict, name: str) -> dict:
    """The act/kv plug-in's name and parameters from the flattened config (`act.clip_ratio` -> clip_ratio)."""
    prefix = f"{name}."
    return {k[len(prefix) :]: v for k, v in sorted(params.items()) if k.startswith(prefix)}


def export_records(tracking_uri: str, experiment: str) -> list[dict]:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"error: no experiment {experiment!r} in {tracking_uri}; run a sweep first")
    client = mlflow.MlflowClient()
    runs = client.search_runs([found.experiment_id], max_results=50000)
    records = []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        if "run_key" not in tags:
            continue
        method_params = {
            k[len("method.") :]: v for k, v in params.items() if k.startswith("method.") and k != "method.name"
        }
        records.append(
            {
                "run_key": tags["run_key"],
                "run_id": run.info.run_id,
                "model": tags.get("model"),
                "method": tags.get("method"),
                "bits": tags.get("bits"),
                "status": "DIVERGED" if tags.get("outcome") == "DIVERGED" else run.info.status,
                "error": tags.get("error", ""),
                "start_time": run.info.start_time,
                "end_time": run.info.end_time,
                "git_commit": tags.get("git_commit", ""),
                "protocol": {
                    name: params.get(key, PROTOCOL_DEFAULTS.get(name)) for name, key in PROTOCOL_PARAMS.items()
                },
                "method_params": dict(sorted(method_params.items())),
                "sixteen_bit_layers": tags.get("sixteen_bit_layers", ""),
                **({"latency_format": tags["latency.format"]} if "latency.format" in tags else {}),
                **_hardware(tags),
                **_versions(tags),
                # the fp32 CPU matmul library (methods/core/cpu_gemm.py): out of the run key, yet GPTQ on Gemma 3
                # moves ~3% in PPL between the two (DEVELOPERS.md); runs logged before the setting ran on MKL
                **({"cpu_gemm": params["cpu_gemm"]} if "cpu_gemm" in params else {}),
                **{name: _plugin_params(params, name) for name in ("act", "kv") if f"{name}.name" in params},
                # the training data of a method that trains (runs logged before it was exported lack it)
                **({"train": _plugin_params(params, "train")} if _trains(tags.get("method")) else {}),
                # the runner's tag: the run was its method's recipe when it ran (harness/recipes.py)
                **({"recipe": tags["recipe"]} if "recipe" in tags else {}),
                "metrics": dict(
                    sorted(
                        (k, v)
                        for k, v in run.data.metrics.items()
                        if k != WINDOW_NLL and not k.startswith(ZS_DOC_PREFIX)
                    )
                ),
                **_zs_documents(client, run.info.run_id, run.data.metrics),
                # a training method's loss per step (methods.core.trainer logs `loss` as a series)
                **(
                    {"train_loss": _series(client, run.info.run_id, TRAIN_LOSS)}
                    if TRAIN_LOSS in run.data.metrics and _trains(tags.get("method"))
                    else {}
                ),
                **(
                    {"window_nll": _series(client, run.info.run_id, WINDOW_NLL)}
                    if WINDOW_NLL in run.data.metrics
                    else {}
                ),
            }
        )
    return select_latest(records)


def _trains(method: str | None) -> bool:
    from methods import METHODS

    return method in METHODS and METHODS[method].trains


def _versions(tags: dict) -> dict:
    """`versions`: the package versions the run was tagged with (`version.<name>`, harness/tracking.py)."""
    found = {k[len("version.") :]: v for k, v in sorted(tags.items()) if k.startswith("version.")}
    return {"versions": found} if found else {}


def _hardware(tags: dict) -> dict:
    """`latency_hardware`: what timed the run's speedup cell (the deployed run's CPU where deployed mode ran)."""
    found = tags.get("deploy.hardware") or tags.get("latency.hardware")
    return {"latency_hardware": found} if found else {}


WINDOW_NLL = "ppl_window_nll"  # a per-window series: the record keeps it as a list (report's paired tests)
TRAIN_LOSS = "loss"  # the trainer's per-step loss series: the record keeps it as a list (loss-curve plots)
ZS_DOC_PREFIX = "zs_doc."  # per-document zero-shot series `zs_doc.<task>.id` / `.correct` (paired tests)


def _zs_documents(client, run_id: str, metrics: dict) -> dict:
    """`zs_documents`: per task, the scored documents' indices and whether each was right (runs logged before
    these were kept have none)."""
    tasks = sorted(
        {k[len(ZS_DOC_PREFIX) : -len(".id")] for k in metrics if k.startswith(ZS_DOC_PREFIX) and k.endswith(".id")}
    )
    found = {
        task: {
            "documents": [int(v) for v in _series(client, run_id, f"{ZS_DOC_PREFIX}{task}.id")],
            "correct": [int(v) for v in _series(client, run_id, f"{ZS_DOC_PREFIX}{task}.correct")],
        }
        for task in tasks
    }
    return {"zs_documents": found} if found else {}


def _series(client, run_id: str, name: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]


RESULT_STATUSES = ("FINISHED", "DIVERGED")  # a run that completed; DIVERGED = its model produced nan/inf


def select_latest(records: list[dict]) -> list[dict]:
    """One record per run key: the latest result (FINISHED or DIVERGED), else the latest ended attempt (runs
    still RUNNING are in progress, not results, and are left out)."""
    best: dict[str, dict] = {}
    records = [r for r in records if r["status"] != "RUNNING"]
    for rec in sorted(records, key=lambda r: (r["status"] in RESULT_STATUSES, r["start_time"] or 0)):
        best[rec["run_key"]] = rec
    return sorted(best.values(), key=lambda r: (r["model"] or "", r["bits"] or "", r["method"] or "", r["run_key"]))


def write_records(records: list[dict], path: Path) -> None:
    """All records or none: a failed write (disk full) leaves the previous file."""
    text = "".join(json.dumps(rec, sort_keys=True) + "\n" for rec in records)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def merge_records(kept: list[dict], fresh: list[dict]) -> list[dict]:
    """One record per run key (sorted) from the file's records and the store's: a run in both is taken from the
    store; then `select_latest`, so a re-run still in progress, killed or failed never hides the key's earlier
    result, and a newer result replaces it."""
    fresh_ids = {rec["run_id"] for rec in fresh}
    return select_latest([rec for rec in kept if rec["run_id"] not in fresh_ids] + fresh)
