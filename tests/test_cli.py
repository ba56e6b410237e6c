"""The CLI end to end on tiny-llama: sweeps, resumption, failures, report and --check (planning and bad input:
test_cli_plan.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli_sweep
from harness.spec import BITS_GRAMMAR
from qkernels.bench import hardware_name

REPO = Path(__file__).resolve().parent.parent


def _env(tmp_path, data_dir):
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "QUANTBENCH_DATA": data_dir,
        "QUANTBENCH_CACHE": str(tmp_path / "cache"),
    }


def _cli(args, tmp_path, data_dir):
    """`python -m harness ARGS` in a fresh interpreter, as a user starts it (runs and sweeps)."""
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=tmp_path,
        env={**os.environ, **_env(tmp_path, data_dir)},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture()
def harness_main(tmp_path, data_dir, monkeypatch, capsys):
    """`python -m harness ARGS` in this process with `_cli`'s environment, for the commands that read the store
    (report, bench runs): the same `main`, without the ~10 s of torch/transformers imports of a fresh interpreter."""
    from harness.__main__ import main

    def run(args):
        for name, value in _env(tmp_path, data_dir).items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(tmp_path)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def _runs(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.get_experiment_by_name("quantbench")
    return mlflow.MlflowClient().search_runs([exp.experiment_id], max_results=1000)


def _short_test_split(tmp_path, data_dir: str, chars: int) -> str:
    """A mirror whose WikiText-2 test split is cut to `chars` characters (the rest linked to the real one): a
    window longer than the split passes planning (it is within the model's context) and fails at run time."""
    mirror = tmp_path / "mirror"
    (mirror / "wikitext-2-raw").mkdir(parents=True)
    for entry in Path(data_dir).iterdir():
        if entry.name != "wikitext-2-raw":
            (mirror / entry.name).symlink_to(entry)
    for split in Path(data_dir, "wikitext-2-raw").iterdir():
        if split.name != "wiki.test.raw":
            (mirror / "wikitext-2-raw" / split.name).symlink_to(split)
    text = Path(data_dir, "wikitext-2-raw", "wiki.test.raw").read_text(encoding="utf-8")[:chars]
    (mirror / "wikitext-2-raw" / "wiki.test.raw").write_text(text, encoding="utf-8")
    return str(mirror)


def test_sweep_failures_resume_and_report(tmp_path, data_dir, harness_main):
    args = [
        "sweep",
        "model=tiny-llama",
        "budget=smoke",
        "bits=w16a16kv16,w4a4kv4,w1.58a16kv16",
        "eval.ppl.seqlen=256,4000",
    ]
    data_dir = _short_test_split(tmp_path, data_dir, 3000)  # ~3,000 byte tokens: 11 windows of 256, none of 4000
    first = _cli(args, tmp_path, data_dir)
    assert first.returncode == 1, first.stderr[-2000:]  # the seqlen longer than the split fails, the rest goes on
    out = first.stdout
    assert out.index("skipping unsupported tiny-llama/rtn/w1.58a16kv16") < out.index("finished")
    assert out.count("unsupported  tiny-llama/rtn/w1.58a16kv16") == 2  # listed, never loaded
    runs = _runs(tmp_path)
    statuses = sorted(r.info.status for r in runs)
    assert statuses == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert all("fewer than one window" in r.data.tags["error"] for r in failed)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert all(r.data.metrics["ppl_windows"] == 2 for r in finished)
    assert all(r.data.metrics["calib_windows"] == 0 for r in finished)  # RTN reads no calibration data
    latency = {r.data.tags["bits"]: r.data.metrics.get("latency.prefill.speedup") for r in finished}
    assert latency["w16a16kv16"] is None and latency["w4a4kv4"] > 0  # the baseline itself has no kernel
    assert {r.data.tags.get("latency.format") for r in finished} == {None, "w4a4-asym"}
    assert {r.data.tags.get("latency.hardware") for r in finished} == {None, hardware_name("cpu")}

    second = _cli(args, tmp_path, data_dir)
    assert "summary: 0 finished, 2 done-before, 2 unsupported, 2 failed" in second.stdout
    assert len([r for r in _runs(tmp_path) if r.info.status == "FINISHED"]) == 2  # nothing duplicated

    reports = tmp_path / "reports"
    assert harness_main(["report", "--out", str(reports)]).returncode == 0
    records = [json.loads(line) for line in (reports / "runs.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["status"] for r in records} == {"FINISHED", "FAILED"}
    board = (reports / "leaderboard.md").read_text()
    assert "### `w4a4kv4`" in board and "FAILED: ValueError" in board
    assert "× / " in board  # the speedup column of the w4a4kv4 row
    assert (reports / "pareto.png").stat().st_size > 1000
    assert harness_main(["report", "--check", "--out", str(reports)]).returncode == 0
    (reports / "leaderboard.md").write_text(board.replace("| rtn |", "| rtn* |", 1))
    check = harness_main(["report", "--check", "--out", str(reports)])
    assert check.returncode == 1 and "does not match" in check.stderr
    (reports / "leaderboard.md").write_text(board)  # a claim's verdict edited by hand is caught the same way
    reproduction = (reports / "reproduction.md").read_text()
    (reports / "reproduction.md").write_text(reproduction + "| a verdict edited by hand | holds |\n")
    check = harness_main(["report", "--check", "--out", str(reports)])
    assert check.returncode == 1 and "reproduction.md does not match" in check.stderr


def test_killed_run_is_marked_and_superseded(tmp_path, data_dir):
    from harness.cli_sweep import CONF_DIR
    from harness.report import export_records
    from harness.runner import spec_from_config
    from harness.tracking import Tracker

    overrides = ["model=tiny-llama", "budget=smoke", "bits=w4a16kv16", "eval.ppl.seqlen=256"]
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        key = spec_from_config(compose("config", overrides=overrides)).run_key
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    stale = tracker.mlflow.start_run(experiment_id=tracker.experiment_id)
    tracker.mlflow.set_tag("run_key", key)
    tracker.mlflow.end_run("RUNNING")  # what a killed process leaves behind
    result = _cli(["run", *overrides], tmp_path, data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    by_id = {r.info.run_id: r.info.status for r in _runs(tmp_path)}
    assert by_id[stale.info.run_id] == "KILLED" and sorted(by_id.values()) == ["FINISHED", "KILLED"]
    records = export_records(uri, "quantbench")
    assert [r["status"] for r in records] == ["FINISHED"]
    assert records[0]["cpu_gemm"] == "onednn"  # the matmul library the run used (not in its key)
    from importlib.metadata import version

    versions = records[0]["versions"]  # the packages the run ran with, tagged and exported
    assert versions["torch"] == version("torch") and versions["transformers"] == version("transformers")
    assert {"lm_eval", "auto_round", "mlflow", "triton"} <= set(versions)


def test_list_names_models_methods_and_grammar(capsys):
    from harness.__main__ import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert (
        "awq, bcq, bitdistiller, gptq, gptq_llmc, hqq, omniquant, paretoq, quarot, quip, quipsharp, r2q, rcp, rsavq, "
        "rtn, signround, smoothquant, spinquant" in out
    )
    assert "smollm2-135m" in out and BITS_GRAMMAR in out
    assert "MISSING" not in out and "method=paretoq: loop.steps=null [>= 0 or null]" in out  # nested leaves, rules
    assert main(["nope"]) == 2
    assert "valid: run, sweep, report" in capsys.readouterr().err


def test_output_piped_into_a_closed_reader_ends_without_a_traceback():
    """`python -m harness rerun --print | head -1`: the reader is gone before the command writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "harness", "list"], cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1 and proc.stderr == ""


def test_bench_unknown_method_lists_valid(capsys):
    from harness.__main__ import main

    assert main(["bench", "forward", "--method", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "error: unknown method 'nope'; valid: awq, bcq, bitdistiller, gptq, gptq_llmc, hqq, omniquant, paretoq, "
        "quarot, quip, quipsharp, r2q, rcp, rsavq, rtn"
    )
    assert "\n" not in err


def test_runs_report_kl_and_top1_against_the_fp_reference(tmp_path, data_dir, harness_main):
    """The first run builds the FP reference before quantizing (cached per model and protocol); every run logs
    KL to FP and top-1 agreement from its perplexity pass; the FP run then agrees with it exactly."""
    args = ["sweep", "model=tiny-llama", "budget=smoke", "bits=w2a16kv16,w16a16kv16", "eval.latency.enabled=false"]
    result = _cli(args, tmp_path, data_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "building the FP reference" in result.stdout + result.stderr
    (reference,) = (tmp_path / "cache" / "fp_reference").glob("tiny-llama-seed0-wikitext2-*.safetensors")
    metrics = {r.data.tags["bits"]: r.data.metrics for r in _runs(tmp_path)}
    assert metrics["w16a16kv16"]["kl_vs_fp"] == pytest.approx(0, abs=1e-4) and metrics["w16a16kv16"]["top1_vs_fp"] == 1
    assert metrics["w2a16kv16"]["kl_vs_fp"] > 1e-5 and metrics["w2a16kv16"]["top1_vs_fp"] < 1
    runs = {r.data.tags["bits"]: r for r in _runs(tmp_path)}  # as a person meets it in the MLflow UI:
    assert runs["w2a16kv16"].info.run_name == "rtn · w2a16kv16"  # short names, model and protocol as tags
    contexts = {d.tags[0].value: d.dataset.name for d in runs["w2a16kv16"].inputs.dataset_inputs}
    assert contexts["evaluation"].startswith("wikitext2-test") and "calibration" not in contexts  # RTN reads none
    import mlflow

    experiment = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("quantbench")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs table
    reports = tmp_path / "reports"  # the per-window NLL series reaches the records (the report's paired tests)
    assert harness_main(["report", "--out", str(reports)]).returncode == 0
    records = [json.loads(line) for line in (reports / "runs.jsonl").read_text().splitlines()]
    assert all(len(r["window_nll"]) == r["metrics"]["ppl_windows"] for r in records) and len(records) == 2
    assert all("ppl_window_nll" not in r["metrics"] for r in records)
    off = _cli([*args[:-1], "eval.fidelity=maybe"], tmp_path, data_dir)
    assert off.returncode == 2 and "eval.fidelity must be true or false, got 'maybe'" in off.stderr


def test_a_run_scores_zero_shot_after_perplexity_and_leaves_no_task_cache(tmp_path, data_dir):
    """eval.zeroshot on a run: lm-eval's scores become `zs.*` metrics; the per-task cache that lets a killed run
    resume (harness/evaluate/zeroshot.py) is removed once the scores are recorded."""
    args = ["run", "model=tiny-llama", "budget=smoke", "eval=fast", "eval.zeroshot.tasks=[winogrande]"]
    result = _cli([*args, "eval.zeroshot.limit=4", "eval.latency.enabled=false"], tmp_path, data_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (run,) = _runs(tmp_path)
    assert 0.0 <= run.data.metrics["zs.winogrande.acc"] <= 1.0 and run.data.metrics["zs.winogrande.sample_len"] == 4
    assert run.data.metrics["zs.avg"] == run.data.metrics["zs.winogrande.acc"]
    assert list((tmp_path / "cache" / "zeroshot").glob("*.json")) == []


def test_bench_runs_measures_latency_of_runs_logged_without_it(tmp_path, data_dir, harness_main):
    args = ["sweep", "model=tiny-llama", "budget=smoke", "bits=w16a16kv16,w4a8kv8", "eval.latency.enabled=false"]
    assert _cli(args, tmp_path, data_dir).returncode == 0
    assert not any("latency.format" in r.data.tags for r in _runs(tmp_path))
    bench = harness_main(["bench", "runs", "--reps", "2"])
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "measured 1 run(s)" in bench.stdout  # the 16-bit baseline has no kernel
    measured = {r.data.tags["bits"]: r for r in _runs(tmp_path)}["w4a8kv8"]
    assert measured.data.tags["latency.format"] == "w4a8-asym"
    assert measured.data.tags["latency.measured_after_run"] == "true"
    assert measured.data.metrics["latency.prefill.speedup"] > 0
    assert "packed_bits_per_weight" in measured.data.metrics  # logged by the run itself, kept as is
    again = harness_main(["bench", "runs", "--reps", "2"])
    assert "measured 0 run(s)" in again.stdout


@pytest.mark.slow  # two joblib workers each import torch and transformers, twice: about two minutes of start-up
def test_parallel_sweep_with_the_joblib_launcher(tmp_path, data_dir):
    """Hydra's joblib launcher runs the jobs in 2 worker processes on one fresh SQLite store (created once by the
    CLI, before workers could race to migrate it); the summary is read back from the store."""
    args = [
        "sweep",
        "model=tiny-llama",
        "budget=smoke",
        "eval.ppl.seqlen=256",
        "bits=w16a16kv16,w4a16kv16,w4a4kv4",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={tmp_path}/multirun",
    ]
    first = _cli(args, tmp_path, data_dir)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "Joblib.Parallel(n_jobs=2" in first.stdout + first.stderr
    assert "summary: 3 finished, 0 done-before, 0 unsupported, 0 failed, 0 missing" in first.stdout
    assert sorted(r.info.status for r in _runs(tmp_path)) == ["FINISHED"] * 3
    second = _cli(args, tmp_path, data_dir)
    assert "summary: 0 finished, 3 done-before" in second.stdout and len(_runs(tmp_path)) == 3


@pytest.mark.slow  # submitit's local executor polls its jobs: about a minute of waiting on tiny runs
def test_sweep_with_the_submitit_launcher(tmp_path, data_dir):
    """SLURM's launcher (submitit) with its local executor: the same jobs, each in a submitit subprocess."""
    args = ["sweep", "model=tiny-llama", "budget=smoke", "eval.ppl.seqlen=256", "bits=w16a16kv16,w4a16kv16"]
    result = _cli([*args, "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}/multirun"], tmp_path, data_dir)
    job_logs = "".join(  # the jobs' own output stays in submitit's folder: shown when the sweep fails
        f"\n--- {log.name}\n{log.read_text(errors='replace')[-1500:]}"
        for log in sorted((tmp_path / "multirun" / ".submitit").glob("*/*_log.*"))
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + job_logs
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    assert "summary: 2 finished, 0 done-before, 0 unsupported, 0 failed, 0 missing" in result.stdout
    assert sorted(r.info.status for r in _runs(tmp_path)) == ["FINISHED"] * 2


@pytest.mark.slow  # a local Ray instance starts in ~5 s; the jobs then run as Ray tasks
def test_sweep_with_the_ray_launcher(tmp_path, data_dir):
    """Ray's launcher against a local Ray instance the sweep starts: the same jobs, each a Ray task, one store.
    hydra-ray-launcher needs cloudpickle<3 (the joblib launcher's joblib needs >=3): run under `nox -s ray`."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the Ray launcher lives in its own env: nox -s ray")
    args = ["sweep", "model=tiny-llama", "budget=smoke", "eval.ppl.seqlen=256", "bits=w16a16kv16,w4a16kv16"]
    launcher = ["hydra/launcher=ray_cluster", "hydra.launcher.ray.init.num_cpus=2"]
    result = _cli([*args, *launcher, f"hydra.sweep.dir={tmp_path}/multirun"], tmp_path, data_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Started a local Ray instance" in result.stdout + result.stderr
    assert "summary: 2 finished, 0 done-before, 0 unsupported, 0 failed, 0 missing" in result.stdout
    assert sorted(r.info.status for r in _runs(tmp_path)) == ["FINISHED"] * 2
    again = _cli([*args, *launcher, f"hydra.sweep.dir={tmp_path}/multirun2"], tmp_path, data_dir)
    assert "summary: 0 finished, 2 done-before" in again.stdout and len(_runs(tmp_path)) == 2


def test_the_slurm_launcher_preset_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(cli_sweep.CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 240)


def test_a_training_method_logs_its_loss_curve_and_cost(tmp_path, data_dir):
    """ParetoQ on tiny-llama through the CLI: training windows from the calibration corpus, the loss per step as
    an MLflow series, the training tokens and seconds as run metrics; the train spec is part of the run key."""
    args = ["run", "model=tiny-llama", "method=paretoq", "bits=w2a16kv16", "budget=smoke", "eval.ppl.seqlen=256"]
    done = _cli([*args, "train.seqlen=64", "method.loop.steps=3"], tmp_path, data_dir)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (run,) = _runs(tmp_path)
    assert run.data.metrics["train_steps"] == 3 and run.data.metrics["train_tokens"] == 3 * 2 * 64
    assert run.data.params["train.dataset"] == "wikitext2-valid"
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2]
    other = _cli([*args, "train.seqlen=32", "method.loop.steps=3"], tmp_path, data_dir)
    assert "summary: 1 finished" in other.stdout  # another training spec is another run key


def test_deployed_mode_checks_and_times_the_packed_model(tmp_path, data_dir, harness_main):
    """eval=deploy: the run records the deployed PPL beside the fake-quant PPL in bf16 (within 0.1%), the kernel
    coverage and batch-1 generation speed; the leaderboard's speedup column shows the end-to-end figure."""
    args = ["sweep", "model=tiny-llama", "budget=smoke", "bits=w4g32a16kv16", "eval=deploy", "eval.deploy.reps=1"]
    assert _cli(args, tmp_path, data_dir).returncode == 0
    (run,) = _runs(tmp_path)
    metrics = run.data.metrics
    assert metrics["deploy.linears_on_kernel"] == metrics["deploy.linears_total"] == 14
    assert abs(metrics["deploy.ppl"] - metrics["deploy.fake_bf16_ppl"]) <= 0.001 * metrics["deploy.fake_bf16_ppl"]
    assert metrics["deploy.deploy.decode_tok_s"] > 0 and metrics["deploy.bf16.decode_tok_s"] > 0
    assert harness_main(["report", "--out", str(tmp_path / "reports")]).returncode == 0
    assert "e2e |" in (tmp_path / "reports" / "leaderboard.md").read_text()


@pytest.mark.slow  # starts an MLflow tracking server (~10 s) and two joblib workers
def test_parallel_workers_log_to_a_tracking_server(tmp_path, data_dir):
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "the MLflow server did not start"
                time.sleep(0.5)
        args = ["sweep", "model=tiny-llama", "budget=smoke", "eval.ppl.seqlen=256", "bits=w16a16kv16,w4a16kv16,w4a4kv4"]
        args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"tracking_uri={uri}"]
        first = _cli(args, tmp_path, data_dir)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        assert "summary: 3 finished, 0 done-before" in first.stdout
        second = _cli(args, tmp_path, data_dir)
        assert "summary: 0 finished, 3 done-before" in second.stdout
        reports = tmp_path / "reports"
        assert _cli(["report", "--tracking-uri", uri, "--out", str(reports)], tmp_path, data_dir).returncode == 0
        assert len((reports / "runs.jsonl").read_text().splitlines()) == 3
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_ui_command_points_at_the_runs_table(tmp_path):
    """MLflow 3 opens an experiment on its GenAI overview; `harness ui` names the runs table's address instead,
    with a saved view whose first column is perplexity, and does not create a store by asking about one that
    does not exist."""
    from harness.__main__ import _runs_table
    from harness.tracking import Tracker

    missing = f"sqlite:///{tmp_path}/none.db"
    assert _runs_table(missing) == "#/experiments" and not (tmp_path / "none.db").exists()
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    view = "runs?viewStateShareKey=quantbench-leaderboard"
    assert _runs_table(f"sqlite:///{tmp_path}/mlflow.db") == f"#/experiments/{tracker.experiment_id}/{view}"
    tags = tracker.mlflow.get_experiment(tracker.experiment_id).tags
    state = json.loads(tags["mlflow.sharedViewState.quantbench-leaderboard"])  # the view the link opens
    assert state["selectedColumns"][0] == state["orderByKey"] == "metrics.`wikitext2_ppl`" and state["orderByAsc"]
