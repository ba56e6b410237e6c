"""Results of runs that finished while the tracking store was unreachable: spooled to local JSON files and
uploaded later by `python -m harness sync` (also at the start of every `run`/`sweep` whose store is reachable).

A spool file holds everything the run would have logged: its run id (when the store was reachable at the
start, the upload completes that run instead of adding a second one), run key, name, tags, params, the config
YAML, every metric with its step, and the final status. Written atomically; deleted only after its upload.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from methods.core.atomic import atomic_write


def spool_dir() -> Path:
    from harness.models import cache_dir

    return cache_dir() / "spool"


def new_record(tracker, run_id, run_key, run_name, tags, params, config_yaml) -> dict:
    return {
        "tracking_uri": tracker.tracking_uri,
        "experiment": tracker.experiment,
        "run_id": run_id,
        "run_key": run_key,
        "run_name": run_name,
        "tags": dict(tags),
        "params": dict(params),
        "config_yaml": config_yaml,
        "metrics": [],  # [key, value, step]
        "status": "RUNNING",
        "start_time": int(time.time() * 1000),
        "offline": False,
    }


def write(record: dict) -> Path:
    record = {**record, "end_time": int(time.time() * 1000)}
    path = spool_dir() / f"{record['run_key']}-{record['run_id']}.json"
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1), encoding="utf-8"))
    return path


def pending(tracking_uri: str | None = None) -> list[Path]:
    """Spool files (of one store, when given), oldest first."""
    files = sorted(spool_dir().glob("*.json"), key=lambda p: p.stat().st_mtime)
    if tracking_uri is None:
        return files
    return [p for p in files if json.loads(p.read_text(encoding="utf-8"))["tracking_uri"] == tracking_uri]


def upload(path: Path, tracker) -> str:
    """Complete the spooled run in the store (or create it, if it never reached the store); delete the file."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    record = json.loads(path.read_text(encoding="utf-8"))
    client = tracker.client
    try:
        run_id = client.get_run(record["run_id"]).info.run_id
        logged = set(client.get_run(run_id).data.params)
    except MlflowException:
        run_id = client.create_run(tracker.experiment_id, start_time=record["start_time"], run_name=record["run_name"])
        run_id, logged = run_id.info.run_id, set()
    params = [Param(k, v) for k, v in record["params"].items() if k not in logged]
    tags = [RunTag(k, v) for k, v in {**record["tags"], "spooled": "true"}.items()]
    metrics = [Metric(k, v, record["end_time"], step) for k, v, step in record["metrics"]]
    for start in range(0, max(len(params), len(tags), 1), 100):
        client.log_batch(run_id, params=params[start : start + 100], tags=tags[start : start + 100])
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    stored = {a.path for a in client.list_artifacts(run_id)}
    for name, text in {"config.yaml": record["config_yaml"], **record.get("artifacts", {})}.items():
        if name not in stored:
            client.log_text(run_id, text, name)
    client.set_terminated(run_id, record["status"], end_time=record["end_time"])
    path.unlink()
    return f"{record['run_name']} ({record['status']}) -> run {run_id}"


def sync(tracker) -> list[str]:
    """Upload every spool file of the tracker's store; one line per uploaded run."""
    return [upload(path, tracker) for path in pending(tracker.tracking_uri)]
