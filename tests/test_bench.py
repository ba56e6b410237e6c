"""`python -m harness bench quantize|eval` measure what a run does (no timing is asserted, only what is measured)."""

from harness.bench import bench_quantize, eval_overhead


def test_bench_quantize_runs_the_method_as_a_run_does(data_dir, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_DATA", data_dir)
    result = bench_quantize("tiny-llama", "gptq", "w3g32a16kv16", ["calib.nsamples=4", "calib.seqlen=64"], 1)
    assert result["calib"] == "4 x 64" and result["quantize_seconds"] > 0
    assert result["gptq_objective"] < result["rtn_objective"]
    assert result["ppl_windows"] == 1 and result["ppl"] > 1


def test_bench_eval_times_the_evaluator_against_the_bare_forward_on_the_same_windows(data_dir, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_DATA", data_dir)
    result = eval_overhead("tiny-llama", windows=1, seqlen=256, reps=2)
    assert len(result["bare"]) == len(result["eval"]) == 2 and result["tokens"] == 256
    assert result["ratio_median"] > 0
