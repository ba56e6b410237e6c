"""MLflow tracking: one run per configuration, keyed by `RunSpec.run_key` so sweeps resume.

Params hold the flattened resolved config, tags hold provenance (git commit, package versions, host,
device, run key), metrics hold every number, and the resolved config YAML is an artifact. A run that
raises ends FAILED with the error in the `error` tag. A run left RUNNING by a killed sweep is marked
KILLED when the same key starts again, so the record shows it and the report never double-counts.
"""

from __future__ import annotations

import contextlib
import platform
import socket
import subprocess
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "quantbench"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance_tags(device: str) -> dict[str, str]:
    tags = {
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "device": device,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for package in ("quantbench", "torch", "transformers", "mlflow", "lm_eval"):
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"version.{package}"] = "not installed"
    return tags


class Tracker:
    def __init__(self, tracking_uri: str = DEFAULT_TRACKING_URI, experiment: str = DEFAULT_EXPERIMENT):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        self.experiment_id = mlflow.set_experiment(experiment).experiment_id
        self.client = mlflow.MlflowClient()

    def runs_with_key(self, run_key: str, status: str | None = None):
        query = f"tags.run_key = '{run_key}'"
        if status:
            query += f" and attributes.status = '{status}'"
        return self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000)

    def finished_run_id(self, run_key: str) -> str | None:
        runs = self.runs_with_key(run_key, "FINISHED")
        return runs[0].info.run_id if runs else None

    def _kill_stale(self, run_key: str) -> None:
        for run in self.runs_with_key(run_key, "RUNNING"):
            self.client.set_tag(run.info.run_id, "error", "interrupted (sweep killed); superseded by a re-run")
            self.client.set_terminated(run.info.run_id, "KILLED")

    @contextlib.contextmanager
    def run(
        self, run_key: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str], config_yaml: str
    ) -> Iterator[Any]:
        """Yield an active MLflow run; end FINISHED, or FAILED with the error tag if the body raises."""
        self._kill_stale(run_key)
        active = self.mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name)
        try:
            self.mlflow.set_tags({"run_key": run_key, **tags})
            self.mlflow.log_params({k: ("null" if v is None else v) for k, v in params.items()})
            self.mlflow.log_text(config_yaml, "config.yaml")
            yield active
        except BaseException as err:
            message = f"{type(err).__name__}: {err}".splitlines()[0][:4000]
            self.mlflow.set_tag("error", message)
            self.mlflow.end_run("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        else:
            self.mlflow.end_run("FINISHED")

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()})

    def log_step_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Per-step series (training loss, learning rate): MLflow plots them as curves."""
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.mlflow.set_tags(dict(tags))
