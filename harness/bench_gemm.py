"""`python -m harness bench gemm`: MKL vs oneDNN fp32 CPU matmuls (methods/core/cpu_gemm.py) on the FP model and a
quantized one: forward speed, a frozen-weight gradient step, and WikiText-2 PPL under each library, timed
alternately in one process as the other benches (harness/bench.py)."""

from __future__ import annotations

import statistics

import torch

from harness import models
from harness.timing import compose_run, time_forward, time_input_gradient_step, timing_overrides, timing_row
from methods import METHODS
from methods.base import QuantContext
from methods.core.cpu_gemm import CPU_GEMMS, use_cpu_gemm


def gemm_comparison(model_name: str, method: str, bits: str, windows: int, seqlen: int, reps: int) -> list[dict]:
    """The FP model and `method` at `bits` (RTN weights for QuaRot, as `bench forward`), each run with every
    fp32 CPU matmul library (methods/core/cpu_gemm.py): forward seconds on one random 1 x `seqlen` batch,
    alternated `reps` times after a warm-up, and WikiText-2 PPL on the first `windows` windows; for the FP model
    also a frozen-weight gradient step (`train_times`: forward + backward to the input embeddings)."""
    from harness import data
    from harness.evaluate.perplexity import perplexity
    from harness.runner import apply, build_plugins

    overrides = timing_overrides(method)
    rows = []
    for name, bits_now in (("FP", "w16a16kv16"), (f"{method} {bits}", bits)):
        run = compose_run(
            model_name, method if bits_now == bits else "rtn", bits_now, overrides if bits_now == bits else []
        )
        model, tokenizer = models.load(run.model)
        entry = METHODS[run.method]
        act, kv = build_plugins(run)
        apply(
            model,
            entry,
            entry.make_config("bench", run.method_params),
            run.bits,
            QuantContext(0, lambda: [], act=act, kv=kv),
        )
        ids = data.ppl_token_ids(run.ppl.dataset, tokenizer, run.data_dir)
        batch = torch.randint(0, model.config.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {gemm: [] for gemm in CPU_GEMMS}
        for gemm in CPU_GEMMS:  # warm-up
            with use_cpu_gemm(gemm):
                time_forward(model, batch, 1)
        train_times: dict[str, list[float]] = {gemm: [] for gemm in CPU_GEMMS}
        for _ in range(reps):
            for gemm in CPU_GEMMS:
                with use_cpu_gemm(gemm):
                    times[gemm] += time_forward(model, batch, 1)
                    if bits_now != bits:  # warm-up step at the first repetition, not timed
                        train_times[gemm] += time_input_gradient_step(model, batch, 2 if not train_times[gemm] else 1)
        for gemm in CPU_GEMMS:
            with use_cpu_gemm(gemm):
                ppl = perplexity(model, ids, seqlen, 1, windows, progress=False).ppl if windows else float("nan")
            rows.append(
                {"model": name, "gemm": gemm, "times": times[gemm], "ppl": ppl, "tokens": seqlen,
                 "train_times": train_times[gemm][1:]}
            )  # fmt: skip
    return rows


def print_gemm_comparison(
    model_name: str, method: str, bits: str, windows: int, seqlen: int, reps: int, eager: bool
) -> int:
    """Run `gemm_comparison` with the act/KV quantizers compiled as evaluation runs them (unless `eager`) and print
    its table: per model and library, forward seconds, tokens/s and PPL; then each library's speed and PPL drift."""
    from methods.core.quantizers import compile_quantizers

    compile_quantizers(not eager)
    rows = gemm_comparison(model_name, method, bits, windows, seqlen, reps)
    print(
        f"fp32 CPU matmuls, {model_name}: forward of 1 x {seqlen} tokens ({torch.get_num_threads()} threads, "
        f"{reps} alternated reps after a warm-up), WikiText-2 PPL on the first {windows} windows"
    )
    print("| model | cpu_gemm | min s | median s | max s | tokens/s | PPL |\n|---|---|---:|---:|---:|---:|---:|")
    for entry in rows:
        median = statistics.median(entry["times"])
        print(
            f"{timing_row(entry['model'] + ' | ' + entry['gemm'], entry['times'])} {entry['tokens'] / median:.0f} | "
            f"{entry['ppl']:.6f} |"
        )
    for model_rows in (rows[:2], rows[2:]):
        by_gemm = {entry["gemm"]: entry for entry in model_rows}
        mkl, onednn = by_gemm["mkl"], by_gemm["onednn"]
        speed = statistics.median(mkl["times"]) / statistics.median(onednn["times"])
        drift = abs(onednn["ppl"] - mkl["ppl"]) / mkl["ppl"]
        print(f"{mkl['model']}: onednn {speed:.2f}x mkl's speed; PPL differs by {drift:.2e} (relative)")
    fp = {entry["gemm"]: entry["train_times"] for entry in rows[:2]}
    print("FP frozen-weight gradient step (forward + backward to the input embeddings, SpinQuant's shape):")
    for gemm in CPU_GEMMS:
        print(timing_row("FP | " + gemm, fp[gemm]))
    print(f"onednn {statistics.median(fp['mkl']) / statistics.median(fp['onednn']):.2f}x mkl's speed")
    return 0
