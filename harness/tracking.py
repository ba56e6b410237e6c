"""MLflow tracking: one run per configuration, keyed by `RunSpec.run_key` so sweeps resume.

Params hold the flattened resolved config, tags hold provenance (git commit, package versions, host,
device, run key), metrics hold every number, and the resolved config YAML is an artifact. A run that
raises ends FAILED with the error in the `error` tag.

Claims: a run *is* the claim on its key. It is created with its key, host, pid and a heartbeat (renewed every
30 s by a daemon thread); a worker that then sees an earlier live RUNNING run of the same key deletes its own
and stands aside (`KeyClaimed`), so two workers never run one key at once. A RUNNING run whose worker is
dead — its pid gone on this host, or its heartbeat older than `QUANTBENCH_CLAIM_TIMEOUT` seconds (300) from
another host — is marked KILLED when the key starts again, so the record shows it and nothing double-counts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from harness import spool

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "quantbench"
HEARTBEAT_SECONDS = 30.0
log = logging.getLogger("quantbench")
DATASET_ATTEMPTS = 3  # racing inserts of one dataset by parallel runs: the retry links to the winner's row


class KeyClaimed(RuntimeError):
    """Another live worker is running this run key."""


def claim_timeout() -> float:
    return float(os.environ.get("QUANTBENCH_CLAIM_TIMEOUT", 300))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def holder_alive(run) -> bool:
    """Whether the worker of a RUNNING run is still at work (runs without claim tags predate claims: dead)."""
    tags = run.data.tags
    beat = tags.get("claim.heartbeat")
    if beat is None:
        return False
    if tags.get("claim.host") == socket.gethostname() and tags.get("claim.pid", "").isdigit():
        return _pid_alive(int(tags["claim.pid"]))
    return time.time() - float(beat) < claim_timeout()


PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


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


# The distributions whose versions can move a number or the run itself; each run tags them (`version.<name>`), the
# records keep them and the leaderboard header names them per section.
VERSIONED_PACKAGES = ("quantbench", "torch", "transformers", "lm_eval", "auto_round", "mlflow", "triton")


def provenance_tags(device: str) -> dict[str, str]:
    tags = {
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "device": device,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for package in VERSIONED_PACKAGES:
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"version.{package}"] = "not installed"
    return tags


class StoreUnreachable(RuntimeError):
    """The tracking store cannot be reached; the message names the URI and the fix."""


UNREACHABLE_MARKERS = ("Max retries exceeded", "Connection refused", "unable to open database", "Name or service")


def is_unreachable(err: BaseException) -> bool:
    """Whether `err` (or what caused it) says the store is down, as opposed to a mistake in what was logged."""
    seen = err
    while seen is not None:
        if isinstance(seen, (ConnectionError, TimeoutError)) or type(seen).__name__ in (
            "ConnectionError",
            "OperationalError",
            "Timeout",
        ):
            return True
        if any(marker in str(seen) for marker in UNREACHABLE_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# MLflow's tracking stores: a local directory (no scheme, or file:), SQL databases, a tracking server, Databricks
TRACKING_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def tracking_uri_problem(tracking_uri: str) -> str | None:
    """Why MLflow cannot use `tracking_uri` as a tracking store (an unsupported scheme), or None."""
    scheme = tracking_uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in tracking_uri else ""
    if len(scheme) == 1:  # a Windows drive letter, C:\...
        scheme = ""
    if scheme not in TRACKING_SCHEMES:
        return (
            f"tracking_uri={tracking_uri} (unsupported scheme {scheme!r}: use sqlite:///mlflow.db, a directory, "
            "or http(s)://host:port of an MLflow server)"
        )
    return None


def check_reachable(tracking_uri: str) -> None:
    """Fail fast with one line: an HTTP server that does not answer within 5 s, or a SQLite file in a missing
    directory (MLflow itself would retry for minutes, or create the file somewhere unexpected)."""
    fix = "start it, or point MLFLOW_TRACKING_URI (or tracking_uri=) at a reachable store"
    problem = tracking_uri_problem(tracking_uri)
    if problem:
        raise StoreUnreachable(f"invalid {problem}")
    if tracking_uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(tracking_uri.rstrip("/") + "/health", timeout=5)
        except requests.RequestException as err:
            raise StoreUnreachable(f"tracking store {tracking_uri} unreachable ({type(err).__name__}); {fix}") from err
    elif tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///") :]).parent
        if not folder.is_dir():
            raise StoreUnreachable(f"tracking store {tracking_uri}: directory {folder} does not exist; {fix}")


def _batches(items: list, size: int = 100) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Tracker:
    def __init__(self, tracking_uri: str = DEFAULT_TRACKING_URI, experiment: str = DEFAULT_EXPERIMENT):
        import mlflow

        check_reachable(tracking_uri)
        self.mlflow = mlflow
        self.tracking_uri, self.experiment = tracking_uri, experiment
        mlflow.set_tracking_uri(tracking_uri)
        try:
            self.experiment_id = mlflow.set_experiment(experiment).experiment_id
        except Exception as err:
            if is_unreachable(err):
                first_line = str(err).splitlines()[0]
                raise StoreUnreachable(f"tracking store {tracking_uri} unreachable: {first_line}") from err
            raise
        self.client = mlflow.MlflowClient(tracking_uri)
        self._pending: dict | None = None  # the active run's record, kept to spool it if the store goes down
        self._set_experiment_kind()

    def _set_experiment_kind(self) -> None:
        """MLflow 3 opens an experiment without a kind on its GenAI traces page ("No data available"); ours is a
        model-development experiment, so the UI opens on the runs table."""
        experiment = self.client.get_experiment(self.experiment_id)
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    def log_datasets(self, datasets: list[tuple[str, str, str, str]]) -> None:
        """The run's data as MLflow dataset inputs (the runs table's Dataset column): (name, digest, source,
        context) — context "evaluation", "calibration" or "training". MLflow looks a dataset up, then inserts it:
        parallel runs of one experiment (a joblib or submitit sweep) that log the same dataset at once race, and
        the loser's insert fails its UNIQUE constraint (the FAILED run of CI's submitit sweep). A retry finds
        the winner's row and links to it. Best effort: if every attempt fails, a warning, and the run goes on
        (its record does not need the inputs)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(Dataset(name, digest, "local", source), [InputTag("mlflow.data.context", context)])
            for name, digest, source, context in datasets
        ]
        for attempt in range(1, DATASET_ATTEMPTS + 1):
            try:
                self._send(self.client.log_inputs, self._pending["run_id"], inputs)
                return
            except Exception as err:  # noqa: BLE001 - the inputs are best effort; the run must not fail on them
                if attempt == DATASET_ATTEMPTS:
                    reason = str(err).splitlines()[0][:200]
                    log.warning("dataset inputs not logged after %d attempts (%s); the run goes on", attempt, reason)
                    return
                time.sleep(0.05 * attempt)

    def runs_with_key(self, run_key: str, status: str | None = None):
        query = f"tags.run_key = '{run_key}'"
        if status:
            query += f" and attributes.status = '{status}'"
        return self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000)

    def finished_run_id(self, run_key: str) -> str | None:
        runs = self.runs_with_key(run_key, "FINISHED")
        return runs[0].info.run_id if runs else None

    def _claim(self, run_key: str, mine, redo_finished: bool) -> None:
        """Raise KeyClaimed if an earlier live run holds the key (or, unless `redo_finished`, it finished
        meanwhile); mark runs of dead workers KILLED."""
        order = (mine.info.start_time, mine.info.run_id)
        for run in self.runs_with_key(run_key):
            if run.info.run_id == mine.info.run_id:
                continue
            if (run.info.status == "FINISHED" and not redo_finished) or (
                run.info.status == "RUNNING" and holder_alive(run) and (run.info.start_time, run.info.run_id) < order
            ):
                holder = f"{run.data.tags.get('claim.host', '?')} pid {run.data.tags.get('claim.pid', '?')}"
                raise KeyClaimed(f"run key {run_key} is {run.info.status.lower()} in run {run.info.run_id} ({holder})")
        for run in self.runs_with_key(run_key, "RUNNING"):
            if run.info.run_id != mine.info.run_id and not holder_alive(run):
                self.client.set_tag(run.info.run_id, "error", "interrupted (its worker died); superseded by a re-run")
                self.client.set_terminated(run.info.run_id, "KILLED")

    def _heartbeat(self, run_id: str, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):  # a busy store misses one beat, not the run
                self.client.set_tag(run_id, "claim.heartbeat", str(int(time.time())))

    @contextlib.contextmanager
    def run(
        self,
        run_key: str,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        config_yaml: str,
        redo_finished: bool = False,
    ) -> Iterator[str]:
        """Claim the key and yield the run id; end FINISHED, or FAILED with the error tag if the body raises.
        Raises KeyClaimed (leaving no run behind) when another live worker holds the key. If the store becomes
        unreachable mid-run, the run goes on and its record is spooled locally (`python -m harness sync`)."""
        claim = {"run_key": run_key, "claim.host": socket.gethostname(), "claim.pid": str(os.getpid())}
        started = time.perf_counter()
        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={**claim, "claim.heartbeat": str(int(time.time()))}
        )
        run_id = run.info.run_id
        try:
            self._claim(run_key, run, redo_finished)
        except KeyClaimed:
            self.client.set_terminated(run_id, "KILLED")
            self.client.delete_run(run_id)
            raise
        params = {k: ("null" if v is None else str(v)) for k, v in params.items()}
        self._pending = spool.new_record(self, run_id, run_key, run_name, {**claim, **tags}, params, config_yaml)
        self._pending["store_seconds"] = time.perf_counter() - started  # creating and claiming the run
        stop = threading.Event()
        threading.Thread(target=self._heartbeat, args=(run_id, stop), daemon=True).start()
        status = "FINISHED"
        try:
            self._send(self._log_params, run_id, params)
            self.set_tags(tags)
            self._send(self.client.log_text, run_id, config_yaml, "config.yaml")
            yield run_id
        except BaseException as err:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            self.set_tags({"error": f"{type(err).__name__}: {err}".splitlines()[0][:4000]})
            raise
        finally:
            stop.set()
            # the run's cost in store calls (all but this metric and the end): the sweep's per-run overhead
            self._log({"tracking_seconds": self._pending["store_seconds"]}, 0)
            self._pending["status"] = status
            self._send(self.client.set_terminated, run_id, status)
            pending, self._pending = self._pending, None
            if pending["offline"]:
                path = spool.write(pending)
                print(
                    f"[quantbench] tracking store {self.tracking_uri} unreachable: {run_name} ({status}) spooled to "
                    f"{path}; `python -m harness sync` uploads it",
                    flush=True,
                )

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        for batch in _batches([Param(k, v) for k, v in params.items()]):
            self.client.log_batch(run_id, params=batch)

    def _send(self, call, *args) -> None:
        """One call to the store; once the store is unreachable, later calls only update the pending record."""
        if self._pending is not None and self._pending["offline"]:
            return
        started = time.perf_counter()
        try:
            call(*args)
        except Exception as err:
            if self._pending is None or not is_unreachable(err):
                raise
            self._pending["offline"] = True
            log.warning("tracking store %s unreachable (%s); spooling this run", self.tracking_uri, type(err).__name__)
        finally:
            if self._pending is not None:
                self._pending["store_seconds"] += time.perf_counter() - started

    def _log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if self._pending is not None:
            self._pending["metrics"].extend([k, float(v), step] for k, v in metrics.items())
        for batch in _batches(items, 1000):
            self._send(self.client.log_batch, self._pending["run_id"], batch)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self._log(metrics, 0)

    def log_series(self, name: str, values) -> None:
        """One metric as a series (step = position), in batches: e.g. the per-window NLL of the PPL pass."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if self._pending is not None:
            self._pending["metrics"].extend([name, float(v), step] for step, v in enumerate(values))
        items = [Metric(name, float(v), now, step) for step, v in enumerate(values)]
        for batch in _batches(items, 1000):
            self._send(self.client.log_batch, self._pending["run_id"], batch)

    def log_step_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Per-step series (training loss, learning rate): MLflow plots them as curves."""
        self._log(metrics, step)

    def log_text(self, name: str, text: str) -> None:
        """A small text artifact of the run (a method's learned codebooks or tables); spooled like the rest."""
        self._pending.setdefault("artifacts", {})[name] = text
        self._send(self.client.log_text, self._pending["run_id"], text, name)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._pending["tags"].update({k: str(v) for k, v in tags.items()})
        for batch in _batches([RunTag(k, str(v)) for k, v in tags.items()]):
            self._send(self.client.log_batch, self._pending["run_id"], (), (), batch)
