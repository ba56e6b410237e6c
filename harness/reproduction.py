"""`reports/reproduction.md` (issue 19 item 1): for every method, the paper's headline setting and number and the
qualitative claims a small model can test, each checked against the recorded runs: holds / does not hold / not
run, with the numbers behind it. Claims are data, `conf/claims/<method>.yaml`:

```yaml
paper: "QuaRot (Ashkboos et al., arXiv 2404.00456)"
headline: {model: LLaMA2-7B, setting: W4A4KV4, wikitext2_ppl: null, source: "not quoted: …"}
claims:
  - text: "QuaRot rescues W4A4KV4 where RTN collapses"
    run: {method: quarot, bits: w4a4kv4}          # the runs the claim is about (best matching configuration)
    below: {method: rtn, bits: w4a4kv4}           # holds if PPL(run) * factor < PPL(below)
    factor: 10
  - text: "KVQuant nuq3-1% is close to FP"
    run: {method: rtn, bits: w16a16kv3, kv: {name: kvquant}}
    within_fp: 0.10                                # holds if PPL(run) <= (1 + 0.10) * PPL(FP)
  - text: "QuIP and GPTQ about equal at W4"
    run: {method: quip, bits: w4a16kv16}
    near: {method: gptq, bits: w4a16kv16}          # holds if |PPL(run) / PPL(near) - 1| <= within
    within: 0.05
```

A run matches a selector when its method, bits and every given method, protocol (e.g. `budget`) or plug-in parameter
equal the selector's (as logged, compared as text); `recipe: true` keeps only the method's recipe runs
(harness/recipes.py). Matching runs that differ only in their seed are one configuration (a run that read no data is
one configuration at any budget). A side must name one configuration — by its parameters or `recipe: true` — or say
`best_of: true`, and then the lowest mean PPL counts (the method at its best, without picking its luckiest seed) and
the table says from how many configurations it was chosen; a side that matches several configurations without saying
so is "ambiguous", which fails `report --check` (issue 49). When both sides of a claim have two or more seeds, the
numbers say whether the gap exceeds the seed spread (Welch's t-test over the seeds' PPL, p < 0.05). Only whole-split
FINISHED runs count. Everything is rendered from `reports/runs.jsonl` alone, and `report --check` compares it, so a
change that breaks a reproduced claim shows in the diff of the generated file.
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import OmegaConf

from harness.frame import CALIB_PARAMS
from harness.recipes import is_recipe
from harness.spec import LEGACY_PLUGIN_PARAMS, BitSpec
from harness.stats import SIGNIFICANCE, mean_ci, welch_p_value

FP = {"method": "rtn", "bits": "w16a16kv16", "recipe": True}
AMBIGUOUS = "ambiguous"


def load_claims(claims_dir: Path) -> list[dict]:
    files = sorted(claims_dir.glob("*.yaml"))
    return [{"file": f.name, **OmegaConf.to_container(OmegaConf.load(f))} for f in files]


def _matches(rec: dict, selector: dict) -> bool:
    if rec["method"] != selector["method"] or rec["bits"] != selector["bits"]:
        return False
    if selector.get("recipe") and not is_recipe(rec):
        return False
    for key, value in selector.get("params", {}).items():
        logged = rec["method_params"].get(key, rec["protocol"].get(key))  # a method parameter or the budget's
        if str(logged) != str(value):
            return False
    for group in ("act", "kv"):
        wanted = selector.get(group)
        if wanted is None:
            continue
        logged = rec.get(group) or {"name": "rtn"}
        if any(str(logged.get(k)) != str(v) for k, v in wanted.items()):
            return False
    return True


def _configuration(rec: dict) -> tuple:
    """What a run was, but for its seed: runs with equal configurations are seeds of one result. Only what can
    change its PPL counts: not the zero-shot tasks, not the act/KV settings (nor their pre-plug-in names among the
    method parameters) where the bits quantize no activations / no cache, not the budget of a run that read no
    data."""
    bits = BitSpec.parse(rec["bits"])
    used = {"act": bits.quantizes_activations, "kv": bits.quantizes_kv}
    unused = {name for group, names in LEGACY_PLUGIN_PARAMS.items() if not used[group] for name in names}
    free = (
        "seed",
        "zs_tasks",
        "zs_limit",
        "zs_sample",
        "zs_sample_seed",
        *(CALIB_PARAMS if _read_no_data(rec) else ()),
    )
    protocol = {k: v for k, v in rec["protocol"].items() if k not in free}
    method_params = {k: v for k, v in rec["method_params"].items() if k not in unused}
    params = tuple(sorted((k, str(v)) for k, v in {**method_params, **protocol}.items()))
    plugins = tuple(
        tuple(sorted((k, str(v)) for k, v in (rec.get(group) or {}).items())) if used[group] else ()
        for group in ("act", "kv")
    )
    return rec["model"], rec["method"], rec["bits"], params, plugins


def _read_no_data(rec: dict) -> bool:
    from methods import METHODS

    entry = METHODS.get(rec["method"])
    return rec["metrics"].get("calib_windows") == 0 and not (entry is not None and entry.trains)


def best_configuration(records: list[dict], model: str, selector: dict) -> tuple[list[dict], int]:
    """The whole-split FINISHED runs of `model` matching the selector that share the configuration with the lowest
    mean PPL, one per seed (the latest), and how many configurations matched; ([], 0) when none matches."""
    found = [
        r
        for r in records
        if r["model"] == model
        and r["status"] == "FINISHED"
        and r["protocol"].get("ppl_max_windows") in (None, "None", "null")
        and r["metrics"].get("wikitext2_ppl") is not None
        and _matches(r, selector)
    ]
    groups: dict[tuple, dict[str, dict]] = {}
    for rec in sorted(found, key=lambda r: r["end_time"] or 0):
        groups.setdefault(_configuration(rec), {})[str(rec["protocol"].get("seed"))] = rec
    best = min((list(seeds.values()) for seeds in groups.values()), key=lambda runs: _mean(_ppls(runs)), default=[])
    return best, len(groups)


def _ppls(runs: list[dict]) -> list[float]:
    return [r["metrics"]["wikitext2_ppl"] for r in runs]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _ppl_text(runs: list[dict], configurations: int = 1) -> str:
    chosen = f" (best of {configurations} configurations)" if configurations > 1 else ""
    if len(runs) == 1:
        return f"{_ppls(runs)[0]:,.2f}{chosen}"
    mean, half = mean_ci(_ppls(runs))
    return f"{mean:,.2f} ± {half:,.2f} ({len(runs)} seeds){chosen}"


def _describe(selector: dict) -> str:
    extra = [f"{k}={v}" for k, v in selector.get("params", {}).items()] + (["recipe"] if selector.get("recipe") else [])
    for group in ("act", "kv"):
        if selector.get(group):
            wanted = dict(selector[group])
            extra.append(f"{group}={wanted.pop('name', 'rtn')}" + "".join(f" {k}={v}" for k, v in wanted.items()))
    return f"{selector['method']} `{selector['bits']}`" + (f" ({', '.join(extra)})" if extra else "")


def check_claim(claim: dict, records: list[dict], model: str) -> tuple[str, str]:
    """(verdict, the numbers behind it) of one claim on one model; a side with several seeds counts by its mean."""
    run_selector = claim["run"]
    other = FP if "within_fp" in claim else claim.get("below", claim.get("near"))
    other_name = "FP" if "within_fp" in claim else _describe(other)
    runs, run_configs = best_configuration(records, model, run_selector)
    others, other_configs = best_configuration(records, model, other)
    if not runs or not others:
        missing = [name for name, r in ((_describe(run_selector), runs), (other_name, others)) if not r]
        return "not run", "no whole-split run of " + " / ".join(missing)
    unsaid = [
        f"{name} matches {count} configurations"
        for name, selector, count in (
            (_describe(run_selector), run_selector, run_configs),
            (other_name, other, other_configs),
        )
        if count > 1 and not selector.get("best_of")
    ]
    if unsaid:
        return AMBIGUOUS, "; ".join(unsaid) + ": pin one (its params, or recipe: true) or say best_of: true"
    run_text, other_text = _ppl_text(runs, run_configs), _ppl_text(others, other_configs)
    ppl, ref = _mean(_ppls(runs)), _mean(_ppls(others))
    if "within_fp" in claim:
        limit = (1 + claim["within_fp"]) * ref
        holds = ppl <= limit
        numbers = f"{run_text} vs FP {other_text} ({100 * (ppl / ref - 1):+.1f}%; limit +{100 * claim['within_fp']:g}%)"
    elif "near" in claim:
        holds = abs(ppl / ref - 1) <= claim["within"]
        numbers = f"{run_text} vs {other_text} ({100 * (ppl / ref - 1):+.1f}%; limit ±{100 * claim['within']:g}%)"
    else:
        factor = claim.get("factor", 1)
        holds = ppl * factor < ref
        numbers = f"{run_text} vs {other_text}" + (f" (needs {factor:g}x lower)" if factor != 1 else "")
    if "within_fp" not in claim:
        p_value = welch_p_value(_ppls(runs), _ppls(others))
        if not math.isnan(p_value):
            spread = "exceeds" if p_value < SIGNIFICANCE else "is within"
            numbers += f"; the gap {spread} the seed spread (Welch p = {p_value:.2g})"
    return ("holds" if holds else "does not hold"), numbers


def render_reproduction(records: list[dict], claims: list[dict]) -> str:
    models = sorted({r["model"] for r in records if r["model"] and not r["model"].startswith("tiny")})
    lines = [
        "# Paper vs ours",
        "",
        "Generated by `python -m harness report` from `reports/runs.jsonl` and `conf/claims/*.yaml`; checked by "
        "`report --check`. Our numbers: WikiText-2 test, whole split, seqlen 2048, the best matching FINISHED "
        "configuration (mean ± 95% CI when it ran at several seeds).",
        "",
        "| method | paper's headline (model, setting, WikiText-2 PPL, source) | claim | " + " | ".join(models) + " |",
        "|---|---|---|" + "---|" * len(models),
    ]
    for spec in claims:
        head = spec.get("headline") or {}
        ppl = head.get("wikitext2_ppl")
        headline = (
            f"{head.get('model', '?')}, {head.get('setting', '?')}, "
            f"{'not quoted' if ppl is None else ppl}; {head.get('source', '?')}"
        )
        for claim in spec.get("claims", []):
            cells = [" — ".join(check_claim(claim, records, model)) for model in models]
            lines.append(f"| {spec['paper']} | {headline} | {claim['text']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ambiguous_claims(records: list[dict], claims: list[dict]) -> list[str]:
    """Each claim (on each model) whose side matches several configurations without pinning one or saying
    `best_of: true`: `report --check` fails on them."""
    models = sorted({r["model"] for r in records if r["model"] and not r["model"].startswith("tiny")})
    found = []
    for spec in claims:
        for claim in spec.get("claims", []):
            for model in models:
                verdict, numbers = check_claim(claim, records, model)
                if verdict == AMBIGUOUS:
                    found.append(f"{spec['file']}: {claim['text']!r} on {model}: {numbers}")
    return found
