"""Zero-shot runs folded into the perplexity rows of the same model (issue 47 item 3).

A zero-shot run (`eval=zs1k`, or a whole-split run) evaluates perplexity too, so it is a second record of a row the
leaderboard already shows. The zero-shot protocol fields do not split sections (frame.SECTION_FREE), and a run with
zero-shot scores whose row identity (model, PPL protocol, method label, bits, seed, the plug-ins that work below 16
bits) and model (the same per-window NLLs where both runs logged them, else the same PPL to 1e-6 relative) match a
run without them gives that row its scores and leaves the table; the row's PPL is the row's own, so no PPL number
moves. Where one model was scored on several document sets, the row takes the leaderboard's protocol first (a seeded
sample: every run on the same documents, so rows pair), then whole splits, then a first-N limit; the others are kept
as `zs_other` for the section header.
"""

from __future__ import annotations

import json
import math

from harness.spec import BitSpec

SCOPE_LETTERS = "ᵃᵇᶜᵈᵉᶠᵍʰ"
IDENTITY = ("model", "protocol", "method", "bits", "p_seed")
NO_VALUE = (None, "None", "null")


def zs_scope(row: dict) -> str | None:
    """The documents a row's zero-shot scores were measured on, in words; None for a row without zero-shot."""
    if row.get("p_zs_tasks") in (*NO_VALUE, "[]"):
        return None
    sample, limit = row.get("p_zs_sample"), row.get("p_zs_limit")
    if sample not in NO_VALUE:
        return (
            f"the same {int(sample):,} documents per task for every run (seeded subset, seed "
            f"{row.get('p_zs_sample_seed')}; whole split where smaller)"
        )
    return "whole splits" if limit in NO_VALUE else f"first {limit} documents per task"


def _preference(row: dict) -> tuple:
    scope = row["zs_scope"]
    rank = 0 if scope.startswith("the same") else 1 if scope == "whole splits" else 2
    return rank, -row["end_time"]


def active_plugins(row: dict) -> str:
    """The row's act/KV plug-ins, leaving out one that works at 16 bits (inert; older records have none)."""
    bits = BitSpec.parse(row["bits"])
    plugins = json.loads(row["plugins"])
    return json.dumps(
        {g: p for g, p in plugins.items() if p and (bits.a if g == "act" else bits.kv) < 16}, sort_keys=True
    )


def same_model(a: dict, b: dict) -> bool:
    """Two runs of one model: equal per-window NLLs where both logged them, else equal PPL to 1e-6 relative (one
    model's PPL moved by ~3e-8 between code versions: the order of float sums)."""
    if a.get("window_nll") and b.get("window_nll"):
        return list(a["window_nll"]) == list(b["window_nll"])
    return a["ppl"] is not None and b["ppl"] is not None and math.isclose(a["ppl"], b["ppl"], rel_tol=1e-6)


def _zs_metrics(row: dict) -> dict:
    return {key: value for key, value in row["metrics"].items() if key.startswith("zs.")}


def fold_zeroshot(rows: list[dict]) -> list[dict]:
    """`rows` (records_frame's dicts) with every zero-shot run folded into the row of the same model (module
    docstring); each row gains `zs_scope` and `zs_other` [(scope, zero-shot metrics)]."""
    for row in rows:
        row["zs_scope"], row["zs_other"] = zs_scope(row), []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "FINISHED":
            key = (*(str(row[field]) for field in IDENTITY), active_plugins(row))
            groups.setdefault(key, []).append(row)
    folded: set[int] = set()
    for group in groups.values():
        scored = sorted((row for row in group if row["zs_scope"]), key=_preference)
        if not scored:
            continue
        pool = [row for row in group if not row["zs_scope"]]
        for run in scored:
            target = next((row for row in pool if same_model(row, run)), None)
            if target is None:  # no row of this model without zero-shot: the run stays a row of its own
                pool.append(run)
                continue
            folded.add(id(run))
            if target["zs_scope"] is None:
                target["metrics"] = {**target["metrics"], **_zs_metrics(run)}
                target["zs_documents"] = run["zs_documents"]
                target["zs_scope"] = run["zs_scope"]
            else:
                target["zs_other"].append((run["zs_scope"], _zs_metrics(run)))
    return [row for row in rows if id(row) not in folded]


def zs_scope_marks(group) -> dict[str, str]:
    """A section's zero-shot document sets, each with the letter its rows' avg cells carry (no letter where the
    section has one set)."""
    scopes = sorted({scope for scope in group.zs_scope if isinstance(scope, str)})
    if len(scopes) == 1:
        return {scopes[0]: ""}
    return {scope: SCOPE_LETTERS[i] for i, scope in enumerate(scopes)}
