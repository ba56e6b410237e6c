"""`python -m harness bench forward|eval|quantize|deploy|load|kernels|runs|gemm|zeroshot`: model load time;
fake-quantized vs FP forward time; the perplexity evaluator vs the bare forward (`eval`); a method's quantization
time (`quantize`); lm-eval's default scoring vs shared-prefix scoring of a zero-shot task (`zeroshot`,
harness/bench_zeroshot.py); MKL vs oneDNN fp32 matmuls on the FP and a quantized model, speed and PPL (`gemm`,
harness/bench_gemm.py); packed-format kernels against dense matmuls (qkernels/bench.py); `runs` backfills the
per-run latency into finished runs of the tracking store logged without it (harness/latency_backfill.py).

Both models are built in the same process and timed alternately (warm-up first) on the same random
2048-token batch; min / median / max over repetitions and the median ratio are printed. The forward's
cost does not depend on the weight values, so GPTQ-based methods are timed with RTN weights (no
calibration needed); the online transforms, activation and KV quantizers are those of the method.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from harness import models
from harness.spec import ModelSpec
from harness.timing import compose_run, time_forward, timing_overrides, timing_row
from methods import METHODS
from methods.base import QuantContext
from methods.core.cpu_gemm import CPU_GEMMS, use_cpu_gemm


def forward_overhead(model_name: str, method: str, bits: str, seqlen: int, reps: int, overrides: list[str]) -> dict:
    """The method with its act/KV plug-ins, composed exactly as a run composes them (`runner.apply`), given no
    calibration windows (pass `method.weights=rtn` to GPTQ-based methods)."""
    from harness.runner import apply

    run = compose_run(model_name, method, bits, overrides)
    fp_model, _ = models.load(run.model)
    q_model, tokenizer = models.load(run.model)
    entry = METHODS[method]
    config = entry.make_config(f"method {method!r}", run.method_params)
    apply(q_model, entry, config, run.bits, _bench_context(run, tokenizer, lambda: []))
    ids = torch.randint(0, fp_model.config.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(0))
    time_forward(fp_model, ids, 1)
    time_forward(q_model, ids, 1)
    fp_times, q_times = [], []
    for _ in range(reps):
        fp_times += time_forward(fp_model, ids, 1)
        q_times += time_forward(q_model, ids, 1)
    return {
        "fp": fp_times,
        "quant": q_times,
        "ratio_median": statistics.median(q_times) / statistics.median(fp_times),
        "threads": torch.get_num_threads(),
    }


def _bench_context(run, tokenizer, calibration=None) -> QuantContext:
    """The context a run gives its method (`runner.make_context`: calibration, training windows, act/KV
    plug-ins), without the run's checkpoint directory: a bench neither resumes nor leaves a training checkpoint."""
    import dataclasses

    from harness.runner import make_context

    ctx = make_context(run, tokenizer)
    return dataclasses.replace(ctx, calibration=calibration or ctx.calibration, checkpoint_dir=None)


def bench_quantize(model_name: str, method: str, bits: str, overrides: list[str], ppl_windows: int) -> dict:
    """One method's quantization exactly as a run does it (`runner.apply`), timed: drawing the calibration
    windows, then the method (calibration forwards, statistics, solve); the layer objective it reports; and,
    if `ppl_windows` > 0, WikiText-2 PPL on the first windows (a quick check that speed did not cost accuracy)."""
    from harness import data
    from harness.evaluate.perplexity import perplexity
    from harness.runner import apply

    run = compose_run(model_name, method, bits, overrides)
    model, tokenizer = models.load(run.model)
    start = time.perf_counter()
    windows = data.calibration_windows(run.calib, tokenizer, run.seed, run.data_dir)
    data_seconds = time.perf_counter() - start
    entry = METHODS[method]
    config = entry.make_config(f"method {method!r}", run.method_params)
    ctx = _bench_context(run, tokenizer, lambda: windows)
    start = time.perf_counter()
    with use_cpu_gemm(run.cpu_gemm):
        summary = apply(model, entry, config, run.bits, ctx)
    result = {
        "calib": f"{len(windows)} x {run.calib.seqlen}",
        "data_seconds": data_seconds,
        "quantize_seconds": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
        "cpu_gemm": run.cpu_gemm,
        **summary.metrics,
    }
    if ppl_windows > 0:
        ids = data.ppl_token_ids(run.ppl.dataset, tokenizer, run.data_dir)
        with use_cpu_gemm(run.cpu_gemm):
            result["ppl"] = perplexity(model, ids, run.ppl.seqlen, 1, ppl_windows, progress=False).ppl
        result["ppl_windows"] = ppl_windows
    return result


def bench_deploy(model_name: str, method: str, bits: str, overrides: list[str], windows: int, reps: int):
    """Deployed mode outside a run (no whole-split PPL): quantize as a run does, then
    `harness.evaluate.deploy.evaluate_deployed` — the PPL check on the first `windows` windows and batch-1
    generation against the bf16 model. Returns (metrics, tags)."""
    import dataclasses

    from harness import data
    from harness.evaluate.deploy import evaluate_deployed
    from harness.runner import apply

    run = compose_run(model_name, method, bits, overrides)
    model, tokenizer = models.load(run.model)
    entry = METHODS[method]
    config = entry.make_config(f"method {method!r}", run.method_params)
    with use_cpu_gemm(run.cpu_gemm):
        apply(model, entry, config, run.bits, _bench_context(run, tokenizer))
    token_ids = data.ppl_token_ids(run.ppl.dataset, tokenizer, run.data_dir)
    sixteen_bit, _ = models.load(run.model)
    settings = dataclasses.replace(run.deploy, windows=windows, reps=reps)
    return evaluate_deployed(model, sixteen_bit, token_ids, run.ppl.seqlen, settings)


def eval_overhead(model_name: str, windows: int, seqlen: int, reps: int) -> dict:
    """The perplexity evaluator (harness/evaluate/perplexity.py) against the bare forward pass (`model(ids)`,
    logits returned, nothing else) over the same WikiText-2 windows, alternated `reps` times after a warm-up."""
    from harness import data
    from harness.evaluate.perplexity import perplexity

    run = compose_run(model_name, "rtn", "w16a16kv16", [])
    model, tokenizer = models.load(run.model)
    ids = data.ppl_token_ids(run.ppl.dataset, tokenizer, run.data_dir)
    batches = ids[0, : windows * seqlen].reshape(windows, 1, seqlen)

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                model(batch, use_cache=False)
        return time.perf_counter() - start

    def evaluator() -> float:
        return perplexity(model, ids, seqlen, 1, windows, progress=False).seconds

    bare(), evaluator()
    bare_times, eval_times = [], []
    for _ in range(reps):
        bare_times.append(bare())
        eval_times.append(evaluator())
    return {
        "bare": bare_times,
        "eval": eval_times,
        "ratio_median": statistics.median(eval_times) / statistics.median(bare_times),
        "tokens": windows * seqlen,
        "threads": torch.get_num_threads(),
    }


def _bench_load(model_name: str, reps: int) -> int:
    """Time `models.load` (the embedded model's first load builds the safetensors cache; later loads read it)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        models.load(ModelSpec(model_name))
        times.append(time.perf_counter() - start)
    print(
        f"load {model_name}: first {times[0]:.2f} s, then min {min(times[1:] or times):.2f} s, "
        f"median {statistics.median(times[1:] or times):.2f} s over {max(1, reps - 1)} loads"
    )
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness bench")
    parser.add_argument(
        "what", choices=["forward", "eval", "quantize", "deploy", "load", "kernels", "runs", "gemm", "zeroshot"]
    )
    parser.add_argument("--models", default="smollm2-135m,llama-2-7b", help="kernels: comma list of shape sets")
    parser.add_argument("--tokens", default="1,2048", help="kernels: comma list of token counts")
    parser.add_argument("--device", default="cpu", help="kernels: cpu, or cuda for the Triton kernels")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="quarot")
    parser.add_argument(
        "--against", default=None, help="quantize: a second method timed in the same process (ours vs a peer)"
    )
    parser.add_argument("--bits", default="w4a4kv4")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--windows", type=int, default=4, help="eval: WikiText-2 windows timed per repetition")
    parser.add_argument("--task", default="hellaswag_mirror", help="zeroshot: the lm-eval task")
    parser.add_argument("--limit", type=int, default=500, help="zeroshot: the task's first documents")
    parser.add_argument("--batch-size", type=int, default=8, help="zeroshot: requests (or packed rows) per forward")
    parser.add_argument("--eager", action="store_true", help="forward, gemm: act/KV quantizers without torch.compile")
    parser.add_argument(
        "--ppl-windows", type=int, default=0, help="quantize, gemm: PPL on the first windows afterwards"
    )
    parser.add_argument(
        "--cpu-gemm", default="onednn", choices=CPU_GEMMS, help="forward, eval: fp32 CPU matmul library (as runs)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="quantize, deploy, forward: config overrides as a run takes them (calib.seqlen=512 ...)",
    )
    args = parser.parse_intermixed_args(argv)
    if args.method not in METHODS:
        print(f"error: unknown method {args.method!r}; valid: {', '.join(sorted(METHODS))}", file=sys.stderr)
        return 2
    if args.what == "kernels":
        from qkernels import bench as kernel_bench

        results = kernel_bench.run(
            args.models.split(","), [int(t) for t in args.tokens.split(",")], args.reps, args.device
        )
        hardware = kernel_bench.hardware_name(args.device)
        print(f"device {args.device} ({hardware}), {torch.get_num_threads()} threads, {args.reps} reps after a warm-up")
        print(kernel_bench.table(results))
        return 0
    if args.what == "runs":
        import os

        from harness.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI

        uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
        from harness.latency_backfill import backfill_latency

        return backfill_latency(uri, DEFAULT_EXPERIMENT, args.reps, args.device)
    if args.what == "load":
        return _bench_load(args.model, args.reps)
    if args.what == "zeroshot":
        from harness.bench_zeroshot import print_comparison

        return print_comparison(args.model, args.task, args.limit, args.batch_size)

    if args.what == "quantize":
        methods = [args.method] + ([args.against] if args.against else [])
        results = {}
        for method in methods:  # each on a fresh load, the same calibration windows (same calib spec and seed)
            results[method] = bench_quantize(args.model, method, args.bits, args.overrides, args.ppl_windows)
            print(f"quantize {args.model} with {method} {args.bits} {' '.join(args.overrides)}")
            print(
                "\n".join(
                    f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}"
                    for name, value in results[method].items()
                )
            )
        if args.against:
            ratio = results[args.against]["quantize_seconds"] / results[args.method]["quantize_seconds"]
            print(f"time ratio {args.against} / {args.method}: {ratio:.2f}x (one process, same windows)")
        return 0
    if args.what == "deploy":
        windows = args.ppl_windows or 2
        metrics, tags = bench_deploy(args.model, args.method, args.bits, args.overrides, windows, args.reps)
        print(
            f"deployed {args.model} {args.method} {args.bits} {' '.join(args.overrides)}: "
            f"kernels {tags['deploy.kernels']}"
        )
        print(f"linears on a kernel: {metrics['deploy.linears_on_kernel']:.0f}/{metrics['deploy.linears_total']:.0f}")
        print(
            f"PPL, first {windows} windows: fake-quant fp32 {metrics['deploy.fake_fp32_ppl']:.4f}, fake-quant bf16 "
            f"{metrics['deploy.fake_bf16_ppl']:.4f}, deployed {metrics['deploy.ppl']:.4f} "
            f"({100 * metrics['deploy.ppl_rel_diff']:.4f}% off)"
        )
        print(
            f"per linear, first window: worst {metrics['deploy.linear_max_ulps']:.2f} bf16 ulps "
            f"({tags['deploy.linear_worst']}, {metrics['deploy.linears_checked']:.0f} linears); "
            f"the check that gates: {tags['deploy.gate']}"
        )
        if "deploy.error" in tags:
            print(f"error: {tags['deploy.error']}", file=sys.stderr)
            return 1
        print("| model | prefill tok/s | decode tok/s |\n|---|---:|---:|")
        for name in ("bf16", "deploy"):
            label = "16-bit (bf16)" if name == "bf16" else f"{args.method} {args.bits} deployed"
            prefill, decode = metrics[f"deploy.{name}.prefill_tok_s"], metrics[f"deploy.{name}.decode_tok_s"]
            print(f"| {label} | {prefill:.1f} | {decode:.1f} |")
        print(
            f"speedup vs bf16 (median of {args.reps}): prefill {metrics['deploy.prefill.speedup']:.2f}x, "
            f"decode {metrics['deploy.decode.speedup']:.2f}x"
        )
        return 0
    if args.what == "gemm":
        from harness.bench_gemm import print_gemm_comparison

        return print_gemm_comparison(
            args.model, args.method, args.bits, args.ppl_windows, args.seqlen, args.reps, args.eager
        )
    if args.what == "eval":
        with use_cpu_gemm(args.cpu_gemm):
            result = eval_overhead(args.model, args.windows, args.seqlen, args.reps)
        print(
            f"{args.model}: {args.windows} windows of {args.seqlen}, fp32 on {args.cpu_gemm}, "
            f"{result['threads']} threads, {args.reps} reps"
        )
        print("| pass | min s | median s | max s |\n|---|---:|---:|---:|")
        print(timing_row("bare forward (logits)", result["bare"]))
        print(timing_row("perplexity evaluator", result["eval"]))
        tok_s = result["tokens"] / statistics.median(result["eval"])
        print(f"median ratio: {result['ratio_median']:.3f}x the bare forward; evaluator {tok_s:.0f} tokens/s")
        return 0
    from methods.core.quantizers import compile_quantizers

    compile_quantizers(not args.eager)  # as evaluation runs them (eval.compile_quantizers)
    overrides = [*timing_overrides(args.method), *args.overrides]
    with use_cpu_gemm(args.cpu_gemm):
        result = forward_overhead(args.model, args.method, args.bits, args.seqlen, args.reps, overrides)

    print(
        f"forward of {args.model}, 1 x {args.seqlen} tokens, fp32 on {args.cpu_gemm}, {result['threads']} threads, "
        f"{args.reps} reps"
    )
    print("| model | min s | median s | max s |\n|---|---:|---:|---:|")
    print(timing_row("FP", result["fp"]))
    quantizers = "eager" if args.eager else "compiled"
    print(timing_row(f"{args.method} {args.bits} (fake-quant, {quantizers} act/KV quantizers)", result["quant"]))
    print(f"median ratio: {result['ratio_median']:.2f}x FP")
    return 0
