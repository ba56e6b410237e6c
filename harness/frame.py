"""Run records -> one pandas DataFrame row per record: the cells the leaderboard and the plots share."""

from __future__ import annotations

import json

import pandas as pd

from harness.labels import row_label
from harness.recipes import is_recipe
from harness.records import PROTOCOL_DEFAULTS
from harness.zs_fold import fold_zeroshot

# Calibration is a property of a row (what the method read), not of the evaluation: sections group runs by
# the evaluation protocol only, and the `calib` column says what each method used.
CALIB_PARAMS = ("calib_dataset", "calib_nsamples", "calib_seqlen", "budget")
ZS_PROTOCOL = ("zs_tasks", "zs_limit", "zs_sample", "zs_sample_seed")
# Runs that differ only in these share a section (seeds: one cell, mean ± CI; zero-shot runs: harness/zs_fold.py).
SECTION_FREE = (*CALIB_PARAMS, "seed", *ZS_PROTOCOL)
UNRECORDED = "not recorded"


def calib_cell(rec: dict) -> str:
    """Calibration windows × tokens the method read; – when it read none (metric `calib_windows` = 0)."""
    used = rec["metrics"].get("calib_windows")
    if used is None:
        return "?"
    if used == 0:
        return "–"
    return f"{int(used)} × {rec['protocol']['calib_seqlen']}"


def speedup_cell(rec: dict) -> str:
    """End-to-end batch-1 generation (deployed mode) where it ran, marked "e2e"; else one block's linears."""
    metrics = rec["metrics"]
    if "deploy.decode.speedup" in metrics:
        on_kernel, total = int(metrics["deploy.linears_on_kernel"]), int(metrics["deploy.linears_total"])
        if on_kernel == 0:
            return "no kernel"
        coverage = "" if on_kernel == total else f" ({on_kernel}/{total} linears)"
        return f"{metrics['deploy.prefill.speedup']:.2f}× / {metrics['deploy.decode.speedup']:.2f}× e2e{coverage}"
    if rec.get("latency_format") == "none":
        return "no kernel"
    prefill, decode = metrics.get("latency.prefill.speedup"), metrics.get("latency.decode.speedup")
    if prefill is None and decode is None:
        return "–"
    return " / ".join("–" if v is None else f"{v:.2f}×" for v in (prefill, decode))


# The packages the leaderboard header names, in this order (the run's tags hold quantbench's version too).
HEADER_PACKAGES = ("torch", "transformers", "lm_eval", "auto_round", "mlflow", "triton")


def versions_text(versions: dict | None) -> str:
    """A record's package versions as one phrase ("torch 2.13.0+cpu, transformers 5.24.0, ..."), or UNRECORDED for
    runs logged before the versions were recorded."""
    if not versions:
        return UNRECORDED
    return ", ".join(f"{name} {versions.get(name, 'not recorded')}" for name in HEADER_PACKAGES)


def records_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record: the leaderboard's cells plus `p_<field>` for each protocol field; a zero-shot run of a
    model that has a row already is folded into that row (`fold_zeroshot`)."""
    rows = []
    for rec in records:
        metrics = rec["metrics"]
        protocol = {**PROTOCOL_DEFAULTS, **rec["protocol"]}  # fields added later, as earlier runs had them
        ppl_name = f"{rec['protocol']['ppl_dataset']}_ppl"
        rows.append(
            {
                "model": rec["model"],
                "method": row_label(rec),
                "bits": rec["bits"],
                "status": rec["status"],
                "error": rec["error"],
                "ppl": metrics.get(ppl_name),
                "bpw": metrics.get("bits_per_weight"),
                "model_mb": metrics.get("model_mb"),
                "packed_bpw": metrics.get("packed_bits_per_weight"),
                "calib": calib_cell(rec),
                "speedup": speedup_cell(rec),
                "hardware": rec.get("latency_hardware", UNRECORDED),
                "versions": versions_text(rec.get("versions")),
                "kv": metrics.get("kv_bytes_per_token"),
                "qsec": metrics.get("quantize_seconds"),
                "tokens": metrics.get("ppl_tokens_total"),
                "windows": metrics.get("ppl_windows"),
                "window_nll": rec.get("window_nll"),
                "recipe": is_recipe(rec),
                "plugins": json.dumps({g: rec.get(g) for g in ("act", "kv")}, sort_keys=True),
                "metrics": metrics,
                "end_time": rec["end_time"] or 0,
                "zs_documents": rec.get("zs_documents") or {},
                "protocol": json.dumps({k: v for k, v in protocol.items() if k not in SECTION_FREE}, sort_keys=True),
                **{f"p_{k}": v for k, v in protocol.items()},
            }
        )
    return pd.DataFrame(fold_zeroshot(rows))


def whole_split(max_windows) -> bool:
    """A protocol's `ppl_max_windows` says the whole test split was evaluated."""
    return max_windows in (None, "None", "null")
