"""MLflow runs -> `reports/runs.jsonl` (exported records) -> `reports/leaderboard.md` + `reports/pareto.png`.

The leaderboard is rendered from the records alone and deterministically, so `report --check` can verify
in CI that the committed leaderboard matches the committed records without any MLflow store.
One run per run key is kept: the latest FINISHED one, else the latest attempt (so a failure shows).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from harness.frame import UNRECORDED, records_frame, whole_split
from harness.overview import best_overview, ppl_overview, seed_spread, zeroshot_overview
from harness.overview import bits_order as _bits_order
from harness.overview import fmt as _fmt
from harness.peers import peer_crosscheck
from harness.records import export_records, merge_records, read_records, write_records
from harness.reproduction import ambiguous_claims, load_claims, render_reproduction
from harness.stats import SIGNIFICANCE, mcnemar_p_value
from harness.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI
from harness.zs_fold import zs_scope_marks
from methods.core.atomic import atomic_write

CLAIMS_DIR = Path(__file__).resolve().parent.parent / "conf" / "claims"

TASK_ORDER = ("piqa", "hellaswag", "hellaswag_mirror", "arc_easy", "arc_challenge", "winogrande", "lambada_openai")
FP_BITS = "w16a16kv16"


MARKS = "¹²³⁴⁵⁶⁷⁸⁹"


def hardware_marks(group: pd.DataFrame) -> dict[str, str]:
    """Hardware -> the mark its speedup cells carry, over a section's timed runs: none when one machine timed
    them all (the header names it), else ¹, ², … by name, runs timed before the hardware was recorded last."""
    timed = group[group.speedup.str.contains("×")]
    found = sorted(set(timed.hardware), key=lambda name: (name == UNRECORDED, name))
    if len(found) <= 1:
        return {name: "" for name in found}
    return {name: MARKS[i] if i < len(MARKS) else f"^{i + 1}" for i, name in enumerate(found)}


def _hardware_lines(group: pd.DataFrame) -> list[str]:
    marks = hardware_marks(group)
    if not marks:
        return []
    timed = group[group.speedup.str.contains("×")]
    counts = timed.hardware.value_counts()

    def named(name: str) -> str:
        runs = f"{counts[name]} run{'s' if counts[name] != 1 else ''}"
        if name == UNRECORDED:
            return f"not recorded ({runs} timed before the hardware was logged)"
        return f"{name} ({runs})"

    if len(marks) == 1:
        return [f"- Speedups timed on: {named(next(iter(marks)))}"]
    return [
        "- Speedups timed on different hardware (a CPU without AMX/AVX512 emulates the bf16 baseline, so its ratios "
        "differ): compare a cell only with cells of the same mark — "
        + "; ".join(f"{mark} {named(name)}" for name, mark in marks.items())
    ]


TRAINING_PLOTS = ("rcp", "r2q", "bitdistiller", "paretoq")  # the QAT methods whose loss curves go to reports/loss/


def _section_order(item) -> tuple:
    """Sections by model, the papers' protocol (whole test split) first, then by protocol."""
    (model, protocol), _ = item
    return (model, json.loads(protocol).get("ppl_max_windows") not in (None, "None", "null"), protocol)


def _section_header(group: pd.DataFrame) -> list[str]:
    first = group.iloc[0]
    finished = group[group.status == "FINISHED"]
    windows = finished.windows.dropna()
    tokens = finished.tokens.dropna()
    seqlen = int(first.p_ppl_seqlen)
    max_windows = first.p_ppl_max_windows
    scope = "whole test split" if whole_split(max_windows) else f"first {max_windows} windows only"
    date = datetime.fromtimestamp(group.end_time.max() / 1000, tz=UTC).strftime("%Y-%m-%d")
    lines = [f"## {first.model} — WikiText-2 {scope}", ""]
    if len(tokens):
        lines.append(
            f'- Perplexity: WikiText-2 raw test ({scope}), rows joined with "\\n\\n", {int(tokens.iloc[0]):,} tokens, '
            f"non-overlapping windows of {seqlen} ({int(windows.max())} windows), eval dtype {first.p_ppl_dtype}"
        )
    datasets = ", ".join(f"`{d}`" for d in sorted(group.p_calib_dataset.dropna().unique()))
    budgets = ", ".join(f"`{b}`" for b in sorted(group.p_budget.dropna().unique()))
    seeds = sorted(group.p_seed.dropna().unique(), key=lambda s: int(s) if str(s).lstrip("-").isdigit() else 0)
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    lines.append(
        f"- Calibration: column `calib` = windows × tokens the method read from {datasets}, {seed_text} "
        f"(– = the method reads no data); budget presets in this section: {budgets}"
    )
    lines.append(
        "- `packed b/w`: bytes of the deployed packed layout (int32 code words, int3 = 10 codes per word); "
        "`speedup` = dense 16-bit time / kernel time of one decoder block's linears, prefill (2048 tokens) / "
        "decode (1 token), median over repetitions (min–max in runs.jsonl); – = no kernel for the format; "
        '"e2e" = deployed mode (`eval=deploy`): batch-1 generation tokens/s of the packed model over the bf16 '
        "model, prefill / decode"
    )
    tasks = zeroshot_tasks(group)
    if tasks:
        scopes = zs_scope_marks(group)
        metrics = ", ".join(f"{task} {_zs_metric(group, task)}" for task in tasks)
        paired = (
            f"; ≈ = not separable from the FP row on the same documents (McNemar's exact test, p ≥ {SIGNIFICANCE})"
            if any(group.zs_documents)
            else ""
        )
        if len(scopes) == 1:
            documents = next(iter(scopes))
        else:
            documents = "the letter after a row's avg names its documents: " + "; ".join(
                f"{mark} {scope}" for scope, mark in scopes.items()
            )
        lines.append(
            f"- Zero-shot: lm-eval, 0-shot, {documents}; accuracy in % ± stderr ({metrics}){paired}; – = not run. "
            "`hellaswag_mirror` is HellaSwag from the offline mirror (no ctx_a/ctx_b: close to, not equal to, "
            "lm-eval's hellaswag)"
        )
        lines += _zs_other_lines(group, tasks)
        lines += _zs_wall_time_lines(group, tasks)
    lines += _contamination_lines(group)
    lines += _hardware_lines(group)
    lines += _versions_lines(group)
    lines += _fidelity_coverage_lines(group)
    lines += [f"- Latest run: {date}", ""]
    return lines


def _versions_lines(group: pd.DataFrame) -> list[str]:
    """The package versions the section's runs ran with, each set with its run count; runs logged before versions
    were recorded are counted as such."""
    counts = group.versions.value_counts()
    known = [(text, n) for text, n in counts.items() if text != UNRECORDED]
    parts = [f"{text} ({n} runs)" for text, n in sorted(known)]
    if UNRECORDED in counts:
        parts.append(f"not recorded for {counts[UNRECORDED]} runs (logged before versions were kept)")
    return ["- Package versions: " + "; ".join(parts)]


def _zs_wall_time_lines(group: pd.DataFrame, tasks: list[str]) -> list[str]:
    """Each run's zero-shot wall time (sum over its tasks, on the machine that ran it), longest task named."""
    parts = []
    for row in group[group.status == "FINISHED"].sort_values(["bits", "method"]).itertuples():
        seconds = {task: row.metrics[f"zs.{task}.seconds"] for task in tasks if f"zs.{task}.seconds" in row.metrics}
        if seconds:
            longest = max(seconds, key=seconds.get)
            total = sum(seconds.values()) / 60
            parts.append(f"{row.method} · {row.bits} {total:,.1f} min ({longest} {seconds[longest] / 60:,.1f})")
    return ["- Zero-shot wall time per run, all tasks (longest task): " + "; ".join(parts)] if parts else []


def _zs_other_lines(group: pd.DataFrame, tasks: list[str]) -> list[str]:
    """Scores of a row's model on other document sets than the row shows (harness/zs_fold.py)."""
    parts = []
    for row in group.sort_values(["bits", "method"]).itertuples():
        for scope, metrics in row.zs_other:
            cells = ", ".join(
                f"{task} {100 * metrics[f'zs.{task}.{_zs_metric(group, task)}']:.1f}"
                for task in tasks
                if f"zs.{task}.{_zs_metric(group, task)}" in metrics
            )
            average = metrics.get("zs.avg")
            cells += "" if average is None else f", avg {100 * average:.1f}"
            parts.append(f"{row.method} · {row.bits} on {scope}: {cells}")
    return ["- The same model on other zero-shot documents: " + "; ".join(parts)] if parts else []


def _contamination_lines(group: pd.DataFrame) -> list[str]:
    """The contamination guard's figures (harness.contamination) for the runs of a section that logged them."""
    parts = []
    for role, label in (("calib", "calibration"), ("train", "training")):
        values = [m[f"contamination.{role}_13gram"] for m in group.metrics if f"contamination.{role}_13gram" in m]
        if values:
            flag = " — above the 1% warning level" if max(values) > 0.01 else ""
            parts.append(f"{label} text at most {100 * max(values):.3f}% ({len(values)} runs){flag}")
    if not parts:
        return []
    return [
        "- Contamination guard: share of the test split's distinct 13-grams (lowercased words) found in the "
        "corpus a run read: " + "; ".join(parts)
    ]


def _fidelity_coverage_lines(group: pd.DataFrame) -> list[str]:
    """How many finished quantized runs of a section lack KL/top-1 vs FP (logged before the fidelity pass existed)."""
    quantized = group[(group.status == "FINISHED") & (group.bits != "w16a16kv16")]
    missing = sum("kl_vs_fp" not in metrics for metrics in quantized.metrics)
    if not missing:
        return []
    return [
        f"- KL/top-1 vs FP: {missing} of {len(quantized)} quantized runs were logged before the fidelity pass "
        "and show –; `python -m harness rerun --missing kl_vs_fp` re-runs them under the same run keys"
    ]


def zeroshot_tasks(group: pd.DataFrame) -> list[str]:
    found = {
        key.split(".")[1]
        for metrics in group.metrics
        for key in metrics
        if key.startswith("zs.") and key.count(".") == 2 and key.endswith(".seconds")
    }
    return sorted(found, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))


def _zs_metric(group: pd.DataFrame, task: str) -> str:
    for metrics in group.metrics:
        if f"zs.{task}.acc_norm" in metrics:
            return "acc_norm"
    return "acc"


def _zs_cell(metrics: dict, task: str, metric: str, documents: dict | None = None, fp: dict | None = None) -> str:
    """Accuracy in % ± stderr; "≈" where the run and the section's FP run scored the same documents and
    McNemar's exact test cannot tell them apart (p ≥ SIGNIFICANCE)."""
    value = metrics.get(f"zs.{task}.{metric}")
    if value is None:
        return "–"
    stderr = metrics.get(f"zs.{task}.{metric}_stderr")
    text = f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")
    ours, theirs = (documents or {}).get(task), (fp or {}).get(task)
    if ours and theirs and ours is not theirs and ours["documents"] == theirs["documents"]:
        if mcnemar_p_value(ours["correct"], theirs["correct"]) >= SIGNIFICANCE:
            text += " ≈"
    return text


def render_leaderboard(records: list[dict]) -> str:
    lines = [
        "# quantbench leaderboard",
        "",
        "Generated by `python -m harness report` from `reports/runs.jsonl` (exported MLflow runs). "
        "Accuracy is measured on the fake-quantized (simulated) model; bits/weight counts codes, scales and "
        "zeros of the quantized decoder linears; model MB counts every stored tensor (embeddings, lm_head and "
        "norms at 16 bit). Δ vs FP is against the `w16a16kv16` run of the same model and protocol. "
        "KL vs FP is the mean KL(P_FP ‖ P_run) in nats per predicted token over FP's top-32 tokens and the rest "
        "(a lower bound on the full KL), top-1 vs FP the share of positions whose most likely token is FP's; both "
        "from the perplexity pass (– for runs logged before they existed).",
        "",
    ]
    if not records:
        return "\n".join(lines + ["No runs yet.", ""])
    frame = records_frame(records)
    for (_, _), group in sorted(frame.groupby(["model", "protocol"], sort=True), key=_section_order):
        lines += _section_header(group)
        lines += ppl_overview(group)
        lines += zeroshot_overview(group)
        lines += best_overview(group)
        lines += seed_spread(group)
        fp = group[(group.bits == FP_BITS) & (group.status == "FINISHED")].sort_values("method")
        fp_ppl = float(fp.ppl.iloc[0]) if len(fp) else None
        fp_documents = fp.zs_documents.iloc[0] if len(fp) else {}
        marks = hardware_marks(group)
        scope_marks = zs_scope_marks(group)
        for bits in sorted(group.bits.unique(), key=_bits_order):
            table = group[group.bits == bits].copy()
            table["failed"] = table.status != "FINISHED"
            table = table.sort_values(["failed", "ppl", "method"], na_position="last")
            seeded = table.groupby("method").p_seed.nunique().to_dict()
            tasks = zeroshot_tasks(table)
            task_metrics = [(task, _zs_metric(group, task)) for task in tasks]
            zs_head = "".join(f" {task} |" for task in tasks) + (" avg zero-shot |" if tasks else "")
            zs_rule = "---:|" * (len(tasks) + (1 if tasks else 0))
            lines += [
                f"### `{bits}`",
                "",
                "| method | bits/weight | packed b/w | WikiText-2 PPL | Δ vs FP | KL vs FP | top-1 vs FP |"
                + zs_head
                + " model MB | KV bytes/token | calib | quantize s | speedup vs 16-bit | status |",
                "|---|---:|---:|---:|---:|---:|---:|" + zs_rule + "---:|---:|---:|---:|---:|---|",
            ]
            for row in table.itertuples():
                delta = "–"
                if fp_ppl is not None and row.ppl is not None and row.ppl == row.ppl and not row.failed:
                    delta = f"{row.ppl - fp_ppl:+,.2f} ({100 * (row.ppl / fp_ppl - 1):+,.1f}%)"
                status = row.status if not row.error else f"{row.status}: {row.error[:120]}"
                zs_cells = "".join(
                    f" {_zs_cell(row.metrics, task, metric, row.zs_documents, fp_documents)} |"
                    for task, metric in task_metrics
                )
                if tasks:
                    avg = row.metrics.get("zs.avg")
                    mark = scope_marks.get(row.zs_scope, "") if row.zs_scope else ""
                    zs_cells += f" {'–' if avg is None else f'{100 * avg:.1f}{mark}'} |"
                kl, top1 = row.metrics.get("kl_vs_fp"), row.metrics.get("top1_vs_fp")
                fidelity = f" {'–' if kl is None else f'{kl:.4f}'} | {'–' if top1 is None else f'{100 * top1:.1f}%'} |"
                label = f"{row.method} (seed {row.p_seed})" if seeded.get(row.method, 1) > 1 else row.method
                lines.append(
                    f"| {label} | {_fmt(row.bpw)} | {_fmt(row.packed_bpw)} | {_fmt(row.ppl)} | {delta} |{fidelity}"
                    f"{zs_cells} {_fmt(row.model_mb, 1)} | {_fmt(row.kv, 0)} | {row.calib} | {_fmt(row.qsec, 1)} | "
                    f"{row.speedup}{marks.get(row.hardware, '') if '×' in row.speedup else ''} | {status} |"
                )
            lines.append("")
    lines += peer_crosscheck(records)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness report")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    parser.add_argument("--out", default="reports", help="directory for runs.jsonl, leaderboard.md, pareto.png")
    parser.add_argument(
        "--check",
        action="store_true",
        help="verify that <out>/leaderboard.md is what <out>/runs.jsonl renders to (no MLflow)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.check:
        records_path, board_path = out / "runs.jsonl", out / "leaderboard.md"
        if not records_path.exists() or not board_path.exists():
            print(
                f"error: {records_path} or {board_path} missing; run `python -m harness report` first", file=sys.stderr
            )
            return 2
        records = read_records(records_path)
        ambiguous = ambiguous_claims(records, load_claims(CLAIMS_DIR))
        if ambiguous:
            print("\n".join(ambiguous), file=sys.stderr)
            print(
                f"error: {len(ambiguous)} claim(s) in {CLAIMS_DIR} match several configurations without saying which: "
                "pin each side (params, or recipe: true) or say best_of: true",
                file=sys.stderr,
            )
            return 1
        for path, expected in (
            (board_path, render_leaderboard(records)),
            (out / "reproduction.md", render_reproduction(records, load_claims(CLAIMS_DIR))),
        ):
            actual = path.read_text(encoding="utf-8") if path.exists() else ""
            if expected != actual:
                diff = difflib.unified_diff(
                    actual.splitlines(), expected.splitlines(), "committed", "rendered", lineterm=""
                )
                print("\n".join(list(diff)[:60]), file=sys.stderr)
                print(
                    f"error: {path} does not match {records_path} (and conf/claims); regenerate with "
                    "`python -m harness report`",
                    file=sys.stderr,
                )
                return 1
        print(f"{board_path} and reproduction.md match {records_path} ({len(records)} runs)")
        return 0
    from harness.plots import plot_claim_losses, plot_pareto, plot_paretoq, plot_training_loss

    fresh = export_records(args.tracking_uri, args.experiment)
    kept = read_records(out / "runs.jsonl") if (out / "runs.jsonl").exists() else []
    records = merge_records(kept, fresh)
    fresh_ids = {rec["run_id"] for rec in fresh}
    from_file = sum(rec["run_id"] not in fresh_ids for rec in records)
    write_records(records, out / "runs.jsonl")
    board = render_leaderboard(records)
    atomic_write(out / "leaderboard.md", lambda tmp: tmp.write_text(board, encoding="utf-8"))
    reproduction = render_reproduction(records, load_claims(CLAIMS_DIR))
    atomic_write(out / "reproduction.md", lambda tmp: tmp.write_text(reproduction, encoding="utf-8"))
    plot_pareto(records, out / "pareto.png")
    claims = OmegaConf.to_container(OmegaConf.load(CLAIMS_DIR / "paretoq.yaml"))
    if plot_paretoq(records, claims, out / "paretoq.png"):
        print(f"wrote {out / 'paretoq.png'}")
    for method in TRAINING_PLOTS:
        if plot_training_loss(records, method, out / "loss" / f"{method}.png"):
            print(f"wrote {out / 'loss' / f'{method}.png'}")
    for claims_file in load_claims(CLAIMS_DIR):
        claims_plot = out / "loss" / f"claims-{Path(claims_file['file']).stem}.png"
        if plot_claim_losses(records, claims_file, claims_plot):
            print(f"wrote {claims_plot}")
    print(
        f"wrote {out / 'runs.jsonl'} ({len(records)} runs: {len(records) - from_file} from {args.tracking_uri}, "
        f"{from_file} kept from the file), {out / 'leaderboard.md'}, {out / 'reproduction.md'}, "
        f"{out / 'pareto.png'}"
    )
    return 0
