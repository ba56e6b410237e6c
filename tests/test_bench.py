"""`python -m harness bench quantize|eval` measure what a run does (no timing is asserted, only what is measured)."""

from harness.bench import bench_quantize, eval_overhead


def test_bench_quantize_runs_the_method_as_a_run_does(data_dir, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_DATA", data_dir)
    result = bench_quantize("tiny-llama", "gptq", "w3g32a16kv16", ["calib.nsamples=4", "calib.seqlen=64"], 1)
    assert result["calib"] == "4 x 64" and result["quantize_seconds"] > 0
    assert result["gptq_objective"] < result["rtn_objective"]
    assert result["ppl_windows"] == 1 and result["ppl"] > 1


def test_bench_quantize_gives_a_training_method_its_training_windows(data_dir, monkeypatch):
    """SpinQuant reads `ctx.training()` as in a run (the bench once passed a context without it: TypeError), and
    learns its rotations on oneDNN under a checkpointed loss."""
    monkeypatch.setenv("QUANTBENCH_DATA", data_dir)
    overrides = ["method.loop.steps=2", "method.weights=rtn", "train.windows=2", "train.seqlen=64"]
    result = bench_quantize("tiny-llama", "spinquant", "w4a4kv4", overrides, 0)
    assert result["cpu_gemm"] == "onednn" and result["train_steps"] == 2
    assert result["train_loss_first"] > 0 and result["rotation_orthogonality_error"] < 1e-4


def test_bench_eval_times_the_evaluator_against_the_bare_forward_on_the_same_windows(data_dir, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_DATA", data_dir)
    result = eval_overhead("tiny-llama", windows=1, seqlen=256, reps=2)
    assert len(result["bare"]) == len(result["eval"]) == 2 and result["tokens"] == 256
    assert result["ratio_median"] > 0


def test_bench_gemm_times_and_scores_both_matmul_libraries_on_the_same_models(data_dir, monkeypatch):
    from harness.bench_gemm import gemm_comparison

    monkeypatch.setenv("QUANTBENCH_DATA", data_dir)
    rows = gemm_comparison("tiny-llama", "rtn", "w4a8kv8", windows=1, seqlen=128, reps=2)
    assert [(r["model"], r["gemm"]) for r in rows] == [
        ("FP", "onednn"),
        ("FP", "mkl"),
        ("rtn w4a8kv8", "onednn"),
        ("rtn w4a8kv8", "mkl"),
    ]
    assert all(len(r["times"]) == 2 and r["ppl"] > 1 for r in rows)
    assert [len(r["train_times"]) for r in rows] == [2, 2, 0, 0]  # FP's frozen-weight gradient step, per library
    assert abs(rows[0]["ppl"] - rows[1]["ppl"]) <= 1e-4 * rows[1]["ppl"]  # FP: the same up to fp32 rounding
