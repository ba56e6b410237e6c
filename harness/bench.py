"""`python -m harness bench forward|load`: model load time; fake-quantized vs FP forward time.

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
from harness.spec import BitSpec, ModelSpec
from methods import METHODS
from methods.base import QuantContext


def _time_forward(model, ids, reps: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            start = time.perf_counter()
            model(ids, use_cache=False)
            times.append(time.perf_counter() - start)
    return times


def forward_overhead(model_name: str, method: str, bits: str, seqlen: int, reps: int, params: dict) -> dict:
    spec = ModelSpec(model_name)
    fp_model, _ = models.load(spec)
    q_model, _ = models.load(spec)
    entry = METHODS[method]
    bitspec = BitSpec.parse(bits)
    entry.supports(bitspec)
    entry.quantize(q_model, entry.make_config(method, params), bitspec, QuantContext(0, lambda: []))
    ids = torch.randint(0, fp_model.config.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(0))
    _time_forward(fp_model, ids, 1)
    _time_forward(q_model, ids, 1)
    fp_times, q_times = [], []
    for _ in range(reps):
        fp_times += _time_forward(fp_model, ids, 1)
        q_times += _time_forward(q_model, ids, 1)
    return {
        "fp": fp_times,
        "quant": q_times,
        "ratio_median": statistics.median(q_times) / statistics.median(fp_times),
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
    parser.add_argument("what", choices=["forward", "load", "kernels"])
    parser.add_argument("--models", default="smollm2-135m,llama-2-7b", help="kernels: comma list of shape sets")
    parser.add_argument("--tokens", default="1,2048", help="kernels: comma list of token counts")
    parser.add_argument("--device", default="cpu", help="kernels: cpu, or cuda for the Triton kernels")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="quarot")
    parser.add_argument("--bits", default="w4a4kv4")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.method not in METHODS:
        print(f"error: unknown method {args.method!r}; valid: {', '.join(sorted(METHODS))}", file=sys.stderr)
        return 2
    if args.what == "kernels":
        from kernels import bench as kernel_bench

        results = kernel_bench.run(
            args.models.split(","), [int(t) for t in args.tokens.split(",")], args.reps, args.device
        )
        print(f"device {args.device}, {torch.get_num_threads()} threads, {args.reps} reps after a warm-up")
        print(kernel_bench.table(results))
        return 0
    if args.what == "load":
        return _bench_load(args.model, args.reps)
    params = {"weights": "rtn"} if args.method == "quarot" else {}
    result = forward_overhead(args.model, args.method, args.bits, args.seqlen, args.reps, params)

    def row(name, times):
        return f"| {name} | {min(times):.3f} | {statistics.median(times):.3f} | {max(times):.3f} |"

    print(f"forward of {args.model}, 1 x {args.seqlen} tokens, fp32, {result['threads']} threads, {args.reps} reps")
    print("| model | min s | median s | max s |\n|---|---:|---:|---:|")
    print(row("FP", result["fp"]))
    print(row(f"{args.method} {args.bits} (fake-quant)", result["quant"]))
    print(f"median ratio: {result['ratio_median']:.2f}x FP")
    return 0
