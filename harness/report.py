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
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from harness.spec import BitSpec
from harness.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI

PROTOCOL_PARAMS = {
    "ppl_dataset": "eval.ppl.dataset",
    "ppl_seqlen": "eval.ppl.seqlen",
    "ppl_dtype": "eval.ppl.dtype",
    "ppl_max_windows": "budget.ppl_max_windows",
    "calib_dataset": "calib.dataset",
    "calib_nsamples": "calib.nsamples",
    "calib_seqlen": "calib.seqlen",
    "budget": "budget.name",
    "seed": "seed",
    "zs_tasks": "eval.zeroshot.tasks",
    "zs_limit": "eval.zeroshot.limit",
}
PROTOCOL_DEFAULTS = {"zs_tasks": "[]", "zs_limit": "null"}  # runs logged before zero-shot existed
# Calibration is a property of a row (what the method read), not of the evaluation: sections group runs by
# the evaluation protocol only, and the `calib` column says what each method used.
CALIB_PARAMS = ("calib_dataset", "calib_nsamples", "calib_seqlen", "budget")
TASK_ORDER = ("piqa", "hellaswag", "hellaswag_mirror", "arc_easy", "arc_challenge", "winogrande", "lambada_openai")
FP_BITS = "w16a16kv16"


def export_records(tracking_uri: str, experiment: str) -> list[dict]:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"error: no experiment {experiment!r} in {tracking_uri}; run a sweep first")
    runs = mlflow.MlflowClient().search_runs([found.experiment_id], max_results=50000)
    records = []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        if "run_key" not in tags:
            continue
        method_params = {
            k[len("method.") :]: v for k, v in params.items() if k.startswith("method.") and k != "method.name"
        }
        records.append(
            {
                "run_key": tags["run_key"],
                "run_id": run.info.run_id,
                "model": tags.get("model"),
                "method": tags.get("method"),
                "bits": tags.get("bits"),
                "status": run.info.status,
                "error": tags.get("error", ""),
                "start_time": run.info.start_time,
                "end_time": run.info.end_time,
                "git_commit": tags.get("git_commit", ""),
                "protocol": {
                    name: params.get(key, PROTOCOL_DEFAULTS.get(name)) for name, key in PROTOCOL_PARAMS.items()
                },
                "method_params": dict(sorted(method_params.items())),
                "sixteen_bit_layers": tags.get("sixteen_bit_layers", ""),
                "metrics": dict(sorted(run.data.metrics.items())),
            }
        )
    return select_latest(records)


def select_latest(records: list[dict]) -> list[dict]:
    """One record per run key: the latest FINISHED, else the latest finished attempt (runs still RUNNING
    are in progress, not results, and are left out)."""
    best: dict[str, dict] = {}
    records = [r for r in records if r["status"] != "RUNNING"]
    for rec in sorted(records, key=lambda r: (r["status"] == "FINISHED", r["start_time"] or 0)):
        best[rec["run_key"]] = rec
    return sorted(best.values(), key=lambda r: (r["model"] or "", r["bits"] or "", r["method"] or "", r["run_key"]))


def write_records(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for rec in records:
            handle.write(json.dumps(rec, sort_keys=True) + "\n")


def read_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _bits_order(bits: str) -> tuple:
    spec = BitSpec.parse(bits)
    return (-spec.w, -spec.a, -spec.kv, -(spec.group or 10**9))


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:,.{digits}f}"


def method_label(method: str, params: dict[str, str]) -> str:
    """The method name plus every parameter that differs from its registered default (e.g. quarot weights=rtn)."""
    import dataclasses

    from methods import METHODS

    entry = METHODS.get(method)
    if entry is None:
        return method
    changed = []
    for f in dataclasses.fields(entry.config_cls):
        if f.name in params:
            default = "null" if f.default is None else str(f.default)
            if params[f.name] != default:
                changed.append(f"{f.name}={params[f.name]}")
    return f"{method} ({', '.join(changed)})" if changed else method


def _calib_cell(rec: dict) -> str:
    """Calibration windows × tokens the method read; – when it read none (metric `calib_windows` = 0)."""
    used = rec["metrics"].get("calib_windows")
    if used is None:
        return "?"
    if used == 0:
        return "–"
    return f"{int(used)} × {rec['protocol']['calib_seqlen']}"


def _speedup_cell(metrics: dict) -> str:
    prefill, decode = metrics.get("latency.prefill.speedup"), metrics.get("latency.decode.speedup")
    if prefill is None and decode is None:
        return "–"
    return " / ".join("–" if v is None else f"{v:.2f}×" for v in (prefill, decode))


def _frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for rec in records:
        metrics = rec["metrics"]
        ppl_name = f"{rec['protocol']['ppl_dataset']}_ppl"
        rows.append(
            {
                "model": rec["model"],
                "method": method_label(rec["method"], rec["method_params"]),
                "bits": rec["bits"],
                "status": rec["status"],
                "error": rec["error"],
                "ppl": metrics.get(ppl_name),
                "bpw": metrics.get("bits_per_weight"),
                "model_mb": metrics.get("model_mb"),
                "packed_bpw": metrics.get("packed_bits_per_weight"),
                "calib": _calib_cell(rec),
                "speedup": _speedup_cell(metrics),
                "kv": metrics.get("kv_bytes_per_token"),
                "qsec": metrics.get("quantize_seconds"),
                "tokens": metrics.get("ppl_tokens_total"),
                "windows": metrics.get("ppl_windows"),
                "metrics": metrics,
                "end_time": rec["end_time"] or 0,
                "protocol": json.dumps(
                    {k: v for k, v in rec["protocol"].items() if k not in CALIB_PARAMS}, sort_keys=True
                ),
                **{f"p_{k}": v for k, v in rec["protocol"].items()},
            }
        )
    return pd.DataFrame(rows)


def _section_order(item) -> tuple:
    """Sections by model, the papers' protocol (whole test split) first, then by protocol."""
    (model, protocol), _ = item
    return (model, json.loads(protocol).get("ppl_max_windows") not in (None, "None", "null"), protocol)


def _whole_split(max_windows) -> bool:
    return max_windows in (None, "None", "null")


def _section_header(group: pd.DataFrame) -> list[str]:
    first = group.iloc[0]
    finished = group[group.status == "FINISHED"]
    windows = finished.windows.dropna()
    tokens = finished.tokens.dropna()
    seqlen = int(first.p_ppl_seqlen)
    max_windows = first.p_ppl_max_windows
    scope = "whole test split" if _whole_split(max_windows) else f"first {max_windows} windows only"
    date = datetime.fromtimestamp(group.end_time.max() / 1000, tz=timezone.utc).strftime("%Y-%m-%d")
    title = f"## {first.model} — WikiText-2 {scope}"
    if first.p_zs_tasks not in (None, "[]"):
        title += ", with zero-shot"
    lines = [title, ""]
    if len(tokens):
        lines.append(
            f'- Perplexity: WikiText-2 raw test ({scope}), rows joined with "\\n\\n", {int(tokens.iloc[0]):,} tokens, '
            f"non-overlapping windows of {seqlen} ({int(windows.max())} windows), eval dtype {first.p_ppl_dtype}"
        )
    datasets = ", ".join(f"`{d}`" for d in sorted(group.p_calib_dataset.dropna().unique()))
    budgets = ", ".join(f"`{b}`" for b in sorted(group.p_budget.dropna().unique()))
    lines.append(
        f"- Calibration: column `calib` = windows × tokens the method read from {datasets}, seed {first.p_seed} "
        f"(– = the method reads no data); budget presets in this section: {budgets}"
    )
    lines.append(
        "- `packed b/w`: bytes of the deployed packed layout (int32 code words, int3 = 10 codes per word); "
        "`speedup` = dense 16-bit time / kernel time of one decoder block's linears, prefill (2048 tokens) / "
        "decode (1 token), median over repetitions (min–max in runs.jsonl); – = no kernel for the format"
    )
    tasks = zeroshot_tasks(group)
    if tasks:
        limit = first.p_zs_limit
        scope = "whole splits" if limit in (None, "None", "null") else f"first {limit} documents per task"
        metrics = ", ".join(f"{task} {_zs_metric(group, task)}" for task in tasks)
        lines.append(
            f"- Zero-shot: lm-eval, 0-shot, {scope}; accuracy in % ± stderr ({metrics}). `hellaswag_mirror` is "
            "HellaSwag from the offline mirror (no ctx_a/ctx_b: close to, not equal to, lm-eval's hellaswag)"
        )
    lines += [f"- Latest run: {date}", ""]
    return lines


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


def _zs_cell(metrics: dict, task: str, metric: str) -> str:
    value = metrics.get(f"zs.{task}.{metric}")
    if value is None:
        return "–"
    stderr = metrics.get(f"zs.{task}.{metric}_stderr")
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def ppl_overview(group: pd.DataFrame) -> list[str]:
    """One protocol section at a glance: bit settings × methods, WikiText-2 PPL of FINISHED runs, the lowest
    per setting in bold. A method with two runs at one setting (two calibration budgets) gets a column per budget."""
    done = group[(group.status == "FINISHED") & group.ppl.notna()].copy()
    if done.empty:
        return []
    repeated = set(done[done.duplicated(["method", "bits"], keep=False)].method)
    done["column"] = [f"{m} [{c}]" if m in repeated else m for m, c in zip(done.method, done.calib, strict=True)]
    columns = sorted(done.column.unique())
    lines = [
        "### Perplexity at a glance",
        "",
        "| bits | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for bits in sorted(done.bits.unique(), key=_bits_order):
        row = done[done.bits == bits].set_index("column").ppl
        best = _fmt(row.min()) if len(row) > 1 else None  # ties at the shown precision are all bold
        cells = [_fmt(row.get(column)) for column in columns]
        cells = [f"**{text}**" if text == best else text for text in cells]
        lines.append(f"| `{bits}` | " + " | ".join(cells) + " |")
    return lines + [""]


def render_leaderboard(records: list[dict]) -> str:
    lines = [
        "# quantbench leaderboard",
        "",
        "Generated by `python -m harness report` from `reports/runs.jsonl` (exported MLflow runs). "
        "Accuracy is measured on the fake-quantized (simulated) model; bits/weight counts codes, scales and "
        "zeros of the quantized decoder linears; model MB counts every stored tensor (embeddings, lm_head and "
        "norms at 16 bit). Δ vs FP is against the `w16a16kv16` run of the same model and protocol.",
        "",
    ]
    if not records:
        return "\n".join(lines + ["No runs yet.", ""])
    frame = _frame(records)
    for (_, _), group in sorted(frame.groupby(["model", "protocol"], sort=True), key=_section_order):
        lines += _section_header(group)
        lines += ppl_overview(group)
        fp = group[(group.bits == FP_BITS) & (group.status == "FINISHED")].sort_values("method")
        fp_ppl = float(fp.ppl.iloc[0]) if len(fp) else None
        tasks = zeroshot_tasks(group)
        task_metrics = [(task, _zs_metric(group, task)) for task in tasks]
        zs_head = "".join(f" {task} |" for task in tasks) + (" avg |" if tasks else "")
        zs_rule = "---:|" * (len(tasks) + (1 if tasks else 0))
        for bits in sorted(group.bits.unique(), key=_bits_order):
            table = group[group.bits == bits].copy()
            table["failed"] = table.status != "FINISHED"
            table = table.sort_values(["failed", "ppl", "method"], na_position="last")
            lines += [
                f"### `{bits}`",
                "",
                "| method | bits/weight | packed b/w | WikiText-2 PPL | Δ vs FP |"
                + zs_head
                + " model MB | KV bytes/token | calib | quantize s | speedup vs 16-bit | status |",
                "|---|---:|---:|---:|---:|" + zs_rule + "---:|---:|---:|---:|---:|---|",
            ]
            for row in table.itertuples():
                delta = "–"
                if fp_ppl is not None and row.ppl is not None and row.ppl == row.ppl and not row.failed:
                    delta = f"{row.ppl - fp_ppl:+.2f} ({100 * (row.ppl / fp_ppl - 1):+.1f}%)"
                status = row.status if not row.error else f"{row.status}: {row.error[:120]}"
                zs_cells = "".join(f" {_zs_cell(row.metrics, task, metric)} |" for task, metric in task_metrics)
                if tasks:
                    avg = row.metrics.get("zs.avg")
                    zs_cells += f" {'–' if avg is None else f'{100 * avg:.1f}'} |"
                lines.append(
                    f"| {row.method} | {_fmt(row.bpw)} | {_fmt(row.packed_bpw)} | {_fmt(row.ppl)} | {delta} |"
                    f"{zs_cells} {_fmt(row.model_mb, 1)} | {_fmt(row.kv, 0)} | {row.calib} | {_fmt(row.qsec, 1)} | "
                    f"{row.speedup} | {status} |"
                )
            lines.append("")
    return "\n".join(lines)


def plot_pareto(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = _frame(records)
    frame = frame[(frame.status == "FINISHED") & frame.ppl.notna() & frame.bpw.notna()]
    groups = sorted(frame.groupby(["model", "protocol"]), key=_section_order) if len(frame) else []
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(6 * max(1, len(groups)), 4.5), squeeze=False)
    for ax, ((model, _), group) in zip(axes[0], groups, strict=False):
        for method, rows in sorted(group.groupby("method")):
            ax.scatter(rows.bpw, rows.ppl, label=method)
            for row in rows.itertuples():
                ax.annotate(row.bits, (row.bpw, row.ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (quantized linears, incl. scales/zeros)")
        ax.set_ylabel("WikiText-2 perplexity (log)")
        windows = group.p_ppl_max_windows.iloc[0]
        ax.set_title(f"{model} ({'whole test split' if _whole_split(windows) else f'first {windows} windows'})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


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
        expected = render_leaderboard(read_records(records_path))
        actual = board_path.read_text(encoding="utf-8")
        if expected != actual:
            diff = difflib.unified_diff(
                actual.splitlines(), expected.splitlines(), "committed", "rendered", lineterm=""
            )
            print("\n".join(list(diff)[:60]), file=sys.stderr)
            print(
                f"error: {board_path} does not match {records_path}; regenerate with `python -m harness report`",
                file=sys.stderr,
            )
            return 1
        print(f"{board_path} matches {records_path} ({len(read_records(records_path))} runs)")
        return 0
    records = export_records(args.tracking_uri, args.experiment)
    write_records(records, out / "runs.jsonl")
    (out / "leaderboard.md").write_text(render_leaderboard(records), encoding="utf-8")
    plot_pareto(records, out / "pareto.png")
    print(f"wrote {out / 'runs.jsonl'} ({len(records)} runs), {out / 'leaderboard.md'}, {out / 'pareto.png'}")
    return 0
