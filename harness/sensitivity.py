"""Per-block sensitivity on request (issue 19 item 3): which decoder blocks does a quantization setting hurt?

`python -m harness sensitivity method=rtn bits=w3g128a16kv16 [--windows 4] [key=value ...]` quantizes a copy of
the model exactly as a run would (method, bits, act/KV plug-ins, calibration), then evaluates the FP model with
one block at a time taken from the quantized copy: PPL and the mean KL from FP's next-token distribution (the
fidelity module's coarse KL over FP's top-32, and top-1 agreement) on the first `windows` test windows.
Writes `reports/sensitivity/<model>-<method>-<bits>.csv` and `.png` (KL per block, bars) and prints the table.

What "one block quantized" means here: the block as the full method left it, so a GPTQ block was calibrated on
the outputs of the quantized blocks before it (the method's own protocol), not re-calibrated in isolation.
Methods that rotate the residual stream (QuaRot, SpinQuant) are refused: their blocks live in a rotated basis
and are not separable from the rotated embeddings.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from harness import data, models
from harness.cli_sweep import CONF_DIR
from harness.evaluate.fidelity import Comparer, Recorder
from harness.evaluate.perplexity import perplexity
from harness.runner import apply, make_context, spec_from_config
from methods import METHODS
from methods.core.arch import arch_of

OUT_DIR = Path("reports") / "sensitivity"


class NotSeparable(ValueError):
    """The method changed the model outside its blocks (a rotated residual stream)."""


def block_sensitivity(spec, windows: int) -> tuple[dict, list[dict]]:
    """(FP row, one row per block: block, ppl, kl_vs_fp, top1_vs_fp) on the first `windows` windows."""
    fp, tokenizer = models.load(spec.model)
    token_ids = data.ppl_token_ids(spec.ppl.dataset, tokenizer, spec.data_dir)
    seqlen = spec.ppl.seqlen
    recorder = Recorder(windows, seqlen - 1)
    fp_result = perplexity(fp, token_ids, seqlen, 1, windows, progress=False, on_chunk=recorder)
    reference = recorder.reference()

    quantized, _ = models.load(spec.model)
    entry = METHODS[spec.method]
    torch.manual_seed(spec.seed)
    config = entry.make_config(spec.method, spec.method_params)
    apply(quantized, entry, config, spec.bits, make_context(spec, tokenizer))
    arch = arch_of(fp)
    fp_embed, q_embed = arch.embeddings(fp).weight, arch.embeddings(quantized).weight
    if fp_embed.shape != q_embed.shape or not torch.equal(fp_embed, q_embed.to(fp_embed.dtype)):
        raise NotSeparable(
            f"{spec.method} changed the embeddings (a rotated residual stream): its blocks cannot be swapped into "
            "the FP model one at a time; use a method that quantizes blocks in place (rtn, gptq, signround, ...)"
        )
    fp_layers, q_layers = arch.layers(fp), arch.layers(quantized)
    rows = []
    for index in range(len(fp_layers)):
        original = fp_layers[index]
        fp_layers[index] = q_layers[index]
        try:
            comparer = Comparer(reference)
            result = perplexity(fp, token_ids, seqlen, 1, windows, progress=False, on_chunk=comparer)
        finally:
            fp_layers[index] = original
        rows.append({"block": index, "ppl": result.ppl, **comparer.metrics()})
        print(f"block {index:3d}: PPL {result.ppl:10.4f}  KL {rows[-1]['kl_vs_fp']:.5f}", flush=True)
    return {"block": "fp", "ppl": fp_result.ppl, "kl_vs_fp": 0.0, "top1_vs_fp": 1.0}, rows


def write_outputs(
    label: str, fp_row: dict, rows: list[dict], out_dir: Path = OUT_DIR, windows: int | None = None
) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / f"{label}.csv", out_dir / f"{label}.png"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["block", "ppl", "kl_vs_fp", "top1_vs_fp"])
        writer.writeheader()
        writer.writerows([fp_row, *rows])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(rows) + 2), 3.6))
    kls = [row["kl_vs_fp"] for row in rows]
    ax.bar([row["block"] for row in rows], kls, color="tab:blue")
    worst = max(range(len(rows)), key=lambda i: kls[i])
    ax.annotate(
        f"PPL {rows[worst]['ppl']:.2f}\n(FP {fp_row['ppl']:.2f})",
        (rows[worst]["block"], kls[worst]),
        ha="center",
        va="bottom",
        fontsize=8,
    )
    ax.set_xlabel("decoder block quantized alone")
    ax.set_ylabel("mean KL(FP ‖ model) per token")
    scope = f", first {windows} test windows" if windows else ""
    ax.set_title(f"{label}: one block quantized at a time{scope}", fontsize=10)
    ax.set_ylim(0, max(kls) * 1.25 if max(kls) > 0 else 1)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return csv_path, png_path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness sensitivity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=4, help="test windows per evaluation (default 4)")
    parser.add_argument("--out", default=str(OUT_DIR))
    parser.add_argument("overrides", nargs="*", help="run keys: method=… bits=… [model=… act=… kv=…]")
    args = parser.parse_args(argv)
    if args.windows < 1:
        print("error: --windows must be >= 1", flush=True)
        return 2
    data.absolute_mirror_env()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        spec = spec_from_config(compose("config", overrides=args.overrides))
    label = f"{spec.model.name}-{spec.method}-{spec.bits}"
    try:
        fp_row, rows = block_sensitivity(spec, args.windows)
    except NotSeparable as refusal:
        print(f"error: {refusal}", flush=True)
        return 2
    csv_path, png_path = write_outputs(label, fp_row, rows, Path(args.out), args.windows)
    print(f"wrote {csv_path} and {png_path}")
    return 0
