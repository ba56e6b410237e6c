"""Faults of the tracking store and of the workers that share it: a key claimed by a live or a dead worker, a
sweep killed with -9 and run again, a store that goes down mid-run or is unreachable at start, parallel runs
racing to log one dataset. Each must end with a clear message and lose nothing already recorded."""

import pytest

from harness.records import export_records
from harness.runner import execute
from harness.tracking import Tracker
from tests.compose import SMOKE, compose_run


def _running(tracker, key, **claim):
    """A RUNNING run of `key` as another worker leaves it, with the given claim tags."""
    run = tracker.client.create_run(tracker.experiment_id, tags={"run_key": key, **claim})
    return run.info.run_id


def _claim_once(tracker, key):
    with tracker.run(key, "name", {}, {}, "config: {}\n"):
        pass


def test_a_live_worker_keeps_its_key_and_a_dead_one_loses_it(tmp_path, monkeypatch):
    import os
    import socket
    import time

    from harness.tracking import KeyClaimed

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    here, now = socket.gethostname(), str(int(time.time()))  # whole seconds, never ahead of the clock
    live = _running(tracker, "k1", **{"claim.host": here, "claim.pid": str(os.getpid()), "claim.heartbeat": now})
    with pytest.raises(KeyClaimed, match=f"run key k1 is running in run {live}"):
        _claim_once(tracker, "k1")
    assert [r.info.run_id for r in tracker.runs_with_key("k1")] == [live]  # the loser left no run behind

    dead = _running(tracker, "k2", **{"claim.host": here, "claim.pid": "999999999", "claim.heartbeat": now})
    _claim_once(tracker, "k2")
    statuses = {r.info.run_id: r.info.status for r in tracker.runs_with_key("k2")}
    assert statuses.pop(dead) == "KILLED" and list(statuses.values()) == ["FINISHED"]

    remote = {"claim.host": "node-17", "claim.pid": "4242"}
    fresh = _running(tracker, "k3", **remote, **{"claim.heartbeat": now})
    with pytest.raises(KeyClaimed):
        _claim_once(tracker, "k3")
    stale = _running(tracker, "k4", **remote, **{"claim.heartbeat": f"{time.time() - 301:.0f}"})
    _claim_once(tracker, "k4")
    assert tracker.client.get_run(stale).info.status == "KILLED"
    monkeypatch.setenv("QUANTBENCH_CLAIM_TIMEOUT", "0")  # the remote worker's claim times out
    _claim_once(tracker, "k3")
    assert tracker.client.get_run(fresh).info.status == "KILLED"
    with pytest.raises(KeyClaimed, match="is finished"):  # finished meanwhile: not run twice
        _claim_once(tracker, "k3")


def test_kill_9_of_a_sweep_then_the_same_sweep_again(tmp_path, data_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "QUANTBENCH_DATA": data_dir,
        "QUANTBENCH_CACHE": str(tmp_path / "cache"),
    }
    # 300 byte-level windows: a few seconds per run, long enough to be killed in
    sweep = ["sweep", "model=tiny-llama", "budget=smoke", "eval.ppl.seqlen=256", "bits=w16a16kv16,w4a16kv16"]
    slow = "budget.ppl_max_windows=300"
    cmd = [sys.executable, "-m", "harness", *sweep, slow]
    tracker = Tracker(env["MLFLOW_TRACKING_URI"])  # the store exists before the sweep starts
    # the w16 run finishes first (Hydra runs the list in order); the w4 run is killed mid-run
    victim = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not any(r.data.tags.get("bits") == "w4a16kv16" and r.info.status == "RUNNING" for r in _all_runs(tracker)):
        assert time.time() < deadline and victim.poll() is None, "the w4 run never started"
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()

    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "summary: 1 finished, 1 done-before" in again.stdout
    uri = env["MLFLOW_TRACKING_URI"]
    by_status = sorted(r.info.status for r in _all_runs(tracker))
    assert by_status == ["FINISHED", "FINISHED", "KILLED"]
    killed = [r for r in _all_runs(tracker) if r.info.status == "KILLED"][0]
    assert "its worker died" in killed.data.tags["error"]
    records = export_records(uri, "quantbench")
    assert sorted(r["bits"] for r in records) == ["w16a16kv16", "w4a16kv16"]  # one row per key
    assert {r["status"] for r in records} == {"FINISHED"}


def _all_runs(tracker):
    return tracker.client.search_runs([tracker.experiment_id], max_results=100)


def test_a_run_that_finishes_while_the_store_is_down_is_spooled_then_synced(tmp_path, data_dir, monkeypatch):
    from mlflow.exceptions import MlflowException

    from harness import spool

    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    down = MlflowException("API request to http://127.0.0.1:5000 failed: Max retries exceeded (Connection refused)")
    log_batch, calls = tracker.client.log_batch, []

    def store_goes_down(*args, **kwargs):  # the params and first tags arrive; then the server is gone
        calls.append(1)
        if len(calls) > 3:
            raise down
        return log_batch(*args, **kwargs)

    def refused(*_args, **_kwargs):
        raise down

    monkeypatch.setattr(tracker.client, "log_batch", store_goes_down)
    monkeypatch.setattr(tracker.client, "set_terminated", refused)
    spec, cfg = compose_run([*SMOKE, "bits=w4a16kv16", f"data_dir={data_dir}"])
    assert execute(spec, cfg, tracker).status == "finished"  # the computation is not lost to the store
    (spooled,) = spool.pending(uri)
    (stranded,) = Tracker(uri).runs_with_key(spec.run_key)
    assert stranded.info.status == "RUNNING" and "wikitext2_ppl" not in stranded.data.metrics

    assert spool.sync(Tracker(uri)) == [f"rtn · w4a16kv16 (FINISHED) -> run {stranded.info.run_id}"]
    assert not spooled.exists() and spool.pending() == []
    (record,) = export_records(uri, "quantbench")  # the same run completed, not a second one
    assert record["status"] == "FINISHED" and record["metrics"]["wikitext2_ppl"] > 1
    assert record["run_id"] == stranded.info.run_id


def test_a_text_artifact_logged_while_the_store_is_down_is_uploaded_by_sync(tmp_path, monkeypatch):
    """A method's artifact (e.g. LO-BCQ's codebooks) survives the store going down like the metrics do."""
    from mlflow.exceptions import MlflowException

    from harness import spool

    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)

    def refused(*_args, **_kwargs):
        raise MlflowException("API request to http://127.0.0.1:5000 failed: Max retries exceeded (Connection refused)")

    with tracker.run("k", "name", {}, {}, "config: {}\n") as run_id:
        for call in ("log_text", "log_batch", "set_terminated"):
            monkeypatch.setattr(tracker.client, call, refused)
        tracker.log_text("codebooks.json", "[[-3, 1, 2]]")
    monkeypatch.undo()
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    assert len(spool.pending(uri)) == 1
    spool.sync(Tracker(uri))
    client = Tracker(uri).client
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "codebooks.json"}
    assert client.get_run(run_id).info.status == "FINISHED"


def test_an_unreachable_store_at_start_is_one_line_naming_it(tmp_path, data_dir):
    import os
    import subprocess
    import sys

    env = {**os.environ, "QUANTBENCH_DATA": data_dir, "QUANTBENCH_CACHE": str(tmp_path / "cache")}
    for uri, reason in (
        ("http://127.0.0.1:9", " unreachable (ConnectionError)"),
        (f"sqlite:///{tmp_path}/no/such/dir/mlflow.db", f": directory {tmp_path}/no/such/dir does not exist"),
    ):
        run = subprocess.run(
            [sys.executable, "-m", "harness", "run", "model=tiny-llama", "budget=smoke", f"tracking_uri={uri}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 2
        assert run.stderr.strip() == (
            f"error: tracking store {uri}{reason}; start it, or point MLFLOW_TRACKING_URI (or tracking_uri=) at a "
            "reachable store"
        )


def test_parallel_runs_logging_the_same_dataset_all_finish_with_it(tmp_path):
    """Parallel runs (a joblib or submitit sweep) log the same evaluation dataset at the same moment. MLflow
    looks the dataset up, then inserts it, so one insert loses on the UNIQUE constraint; that failed a run of
    CI's submitit sweep. Every run must still finish, linked to the one dataset row."""
    import threading

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(uri)  # the CLI creates the store once, before the workers start
    rounds, workers = 12, 2
    barrier, errors = threading.Barrier(workers), []

    def worker(index):
        tracker = Tracker(uri)
        for round_ in range(rounds):
            try:
                with tracker.run(f"k{round_}-{index}", "name", {}, {}, "config: {}\n"):
                    barrier.wait(timeout=60)  # both runs reach the dataset insert together
                    tracker.log_datasets([(f"wikitext2-test-{round_}", "digest", "/data/test", "evaluation")])
            except Exception as err:  # noqa: BLE001 - reported by the assert below
                errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    tracker = Tracker(uri)
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=100)
    assert len(runs) == rounds * workers and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        round_ = run.data.tags["run_key"][1:].split("-")[0]
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == [f"wikitext2-test-{round_}"]
