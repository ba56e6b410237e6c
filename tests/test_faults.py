"""Faults injected on tiny-llama: a model that diverges, a run that runs out of memory, writes that fail
half-way, a corrupted model cache. Each must end with a clear message and lose nothing already recorded."""

import errno

import pytest
import torch
from hydra import compose, initialize_config_dir

from harness.cli_sweep import CONF_DIR, recorded_outcomes
from harness.evaluate.divergence import first_nonfinite_module
from harness.records import export_records
from harness.report import render_leaderboard
from harness.runner import execute, spec_from_config
from harness.tracking import Tracker
from methods import METHODS, rtn
from methods.base import MethodEntry

SMOKE = ["model=tiny-llama", "budget=smoke", "eval.ppl.seqlen=256"]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return spec_from_config(cfg), cfg


def _poisoned_rtn(target: str):
    def quantize(model, config, bits, ctx):
        summary = rtn.quantize(model, config, bits, ctx)
        with torch.no_grad():
            model.get_submodule(target).weight.fill_(float("inf"))
        return summary

    return MethodEntry(rtn.RTNConfig, supports=rtn.supports, quantize=quantize)


def test_first_nonfinite_module_names_the_innermost_module(tiny):
    model, _ = tiny
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    assert first_nonfinite_module(model, ids) is None
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    assert first_nonfinite_module(model, ids) == "model.layers.1.mlp.down_proj"


def test_a_diverged_model_ends_diverged_with_its_first_layer(tmp_path, data_dir, monkeypatch):
    monkeypatch.setitem(METHODS, "rtn", _poisoned_rtn("model.layers.1.self_attn.o_proj"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec, cfg = _compose([*SMOKE, "bits=w4a16kv16", f"data_dir={data_dir}"])
    outcome = execute(spec, cfg, Tracker(uri))
    assert outcome.status == "diverged"
    assert outcome.detail == "non-finite output first at model.layers.1.self_attn.o_proj (window 0)"
    (record,) = export_records(uri, "quantbench")
    assert record["status"] == "DIVERGED" and "wikitext2_ppl" not in record["metrics"]
    assert record["metrics"]["diverged_window"] == 0  # evaluation stopped at the first window
    assert recorded_outcomes([(spec, (uri, "quantbench"))], 0)[spec.run_key][1] == "diverged"
    board = render_leaderboard([record])
    assert "| DIVERGED: non-finite output first at model.layers.1.self_attn.o_proj (window 0) |" in board
    # a diverged run is a result: the same key is not redone
    assert execute(spec, cfg, Tracker(uri)).status == "done-before"


def test_out_of_memory_fails_that_run_and_the_next_goes_on(tmp_path, data_dir, monkeypatch):
    def out_of_memory(model, config, bits, ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setitem(
        METHODS, "gptq", MethodEntry(METHODS["gptq"].config_cls, supports=lambda r: None, quantize=out_of_memory)
    )
    failing, failing_cfg = _compose([*SMOKE, "method=gptq", "bits=w4a16kv16", f"data_dir={data_dir}"])
    fine, fine_cfg = _compose([*SMOKE, "bits=w4a16kv16", f"data_dir={data_dir}"])
    assert execute(failing, failing_cfg, Tracker(uri)).status == "failed"
    assert execute(fine, fine_cfg, Tracker(uri)).status == "finished"
    records = {r["method"]: r for r in export_records(uri, "quantbench")}
    assert records["gptq"]["status"] == "FAILED"
    assert records["gptq"]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert records["rtn"]["status"] == "FINISHED"
    # the sweep's summary says why (a launcher such as submitit keeps the job's own log in its folder)
    outcomes = recorded_outcomes([(failing, (uri, "quantbench")), (fine, (uri, "quantbench"))], 0)
    assert outcomes[failing.run_key][1:] == (
        "failed",
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB",
    )
    assert outcomes[fine.run_key][1:] == ("finished", "")


def test_a_write_that_fails_half_way_leaves_no_file_and_says_why(tmp_path):
    from methods.core.atomic import WriteFailed, atomic_write

    target = tmp_path / "records.jsonl"
    target.write_text("the old, complete contents\n")

    def half_then_disk_full(path):
        path.write_text("half a rec")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteFailed) as err:
        atomic_write(target, half_then_disk_full)
    message = str(err.value)
    assert "no space left" in message.lower() and str(target) in message and "\n" not in message
    assert target.read_text() == "the old, complete contents\n"  # never replaced by the half-written file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]  # no temporary left behind


def test_records_written_while_the_disk_is_full_keep_the_old_file(tmp_path, monkeypatch):
    from harness import records as records_module
    from methods.core.atomic import WriteFailed

    path = tmp_path / "runs.jsonl"
    records_module.write_records([{"run_key": "a"}], path)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("methods.core.atomic.os.replace", full)
    with pytest.raises(WriteFailed):
        records_module.write_records([{"run_key": "a"}, {"run_key": "b"}], path)
    assert records_module.read_records(path) == [{"run_key": "a"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.jsonl"]


def _tiny_cache_builds(monkeypatch, seconds: float = 0.0):
    """models._build_cache replaced by what it does, from tiny-llama instead of a GGUF, taking `seconds`;
    returns (the tiny model, the list of targets built so far)."""
    import time

    from harness import models
    from methods.core.atomic import atomic_directory

    model, tokenizer = models.tiny_llama(seed=0)
    builds = []

    def build(target, _gguf):
        builds.append(target)
        time.sleep(seconds)

        def write(tmp):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            models.write_checksums(tmp)

        atomic_directory(target, write)

    monkeypatch.setattr(models, "_build_cache", build)
    return model, builds


def test_a_truncated_model_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, capsys):
    from harness import models

    model, builds = _tiny_cache_builds(monkeypatch)
    target = tmp_path / "tiny-cache"
    models._load_cached_gguf(target, lambda: tmp_path / "model.gguf", torch.float32)
    assert len(builds) == 1 and models.cache_problem(target) is None
    models._load_cached_gguf(target, lambda: tmp_path / "model.gguf", torch.float32)
    assert len(builds) == 1  # a sound cache is used as it is

    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut off half-way
    assert "model.safetensors does not match its sha256" in models.cache_problem(target)
    loaded, _ = models._load_cached_gguf(target, lambda: tmp_path / "model.gguf", torch.float32)
    assert len(builds) == 2 and models.cache_problem(target) is None
    assert (
        "model.safetensors does not match its sha256 (truncated or modified); rebuilding it" in capsys.readouterr().err
    )
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)

    (target / models.CHECKSUMS).unlink()  # a cache from before checksums existed
    models._load_cached_gguf(target, lambda: tmp_path / "model.gguf", torch.float32)
    assert len(builds) == 3 and "no sha256sums.json" in capsys.readouterr().err


def test_two_loaders_of_an_empty_model_cache_build_it_once(tmp_path, monkeypatch):
    """Parallel workers (a joblib sweep, pytest -n) that find no cache: one builds it while the other waits,
    then both load the same files (without the lock each built a copy and swapped it in under the other)."""
    import threading

    from harness import models

    model, builds = _tiny_cache_builds(monkeypatch, seconds=0.5)  # the other loader arrives while it builds
    target = tmp_path / "tiny-cache"
    loaded, errors = [], []

    def load():
        try:
            loaded.append(models._load_cached_gguf(target, lambda: tmp_path / "model.gguf", torch.float32)[0])
        except Exception as err:  # noqa: BLE001 - reported by the assert below
            errors.append(err)

    workers = [threading.Thread(target=load) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == [] and len(builds) == 1 and len(loaded) == 2
    assert all(torch.equal(m.lm_head.weight, model.lm_head.weight) for m in loaded)


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
    spec, cfg = _compose([*SMOKE, "bits=w4a16kv16", f"data_dir={data_dir}"])
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
