"""Run records as `reports/runs.jsonl` holds them, for the report and overview tests."""

PROTOCOL = {
    "ppl_dataset": "wikitext2",
    "ppl_seqlen": "2048",
    "ppl_dtype": "float32",
    "ppl_max_windows": "null",
    "calib_dataset": "wikitext2-valid",
    "calib_nsamples": "128",
    "calib_seqlen": "2048",
    "budget": "full",
    "seed": "0",
    "zs_tasks": "[]",
    "zs_limit": "null",
}

# QuaRot's parameters added after earlier records (a record lacking them is labelled with their legacy values).
QUAROT_NOW = {"signs_first": "True", "solve_dtype": "float32"}


def _record(key, method, bits, ppl, status="FINISHED", start=1, params=None, error=""):
    metrics = (
        {}
        if ppl is None
        else {
            "wikitext2_ppl": ppl,
            "bits_per_weight": 4.25,
            "model_mb": 100.0,
            "kv_bytes_per_token": 1000.0,
            "quantize_seconds": 2.0,
            "ppl_tokens_total": 304986.0,
            "ppl_windows": 148.0,
        }
    )
    return {
        "run_key": key,
        "run_id": key + str(start),
        "model": "m",
        "method": method,
        "bits": bits,
        "status": status,
        "error": error,
        "start_time": start,
        "end_time": 1795000000000 + start,
        "git_commit": "",
        "protocol": dict(PROTOCOL),
        "method_params": params or {},
        "sixteen_bit_layers": "",
        "metrics": metrics,
    }


def as_recipe(rec: dict) -> dict:
    """The record as its method's recipe run would log it (harness/recipes.py): the family's budget and its
    calibration, the method's act/KV recipe on the plug-ins its bits use, the windows it read (none for RTN)."""
    from harness.recipes import reference
    from harness.spec import BitSpec

    plugins = {group: (rec.get(group) or {}).get("name", "rtn") for group in ("act", "kv")}
    ref = reference(rec["method"], plugins["act"], plugins["kv"])
    rec["protocol"] = {**rec["protocol"], "budget": ref.budget, **ref.calib}
    bits = BitSpec.parse(rec["bits"])
    for group, used in (("act", bits.quantizes_activations), ("kv", bits.quantizes_kv)):
        if used:
            rec[group] = dict(ref.plugins[group])
    reads = rec["method"] != "rtn" or plugins["kv"] != "rtn"
    rec["metrics"]["calib_windows"] = float(ref.calib["calib_nsamples"]) if reads else 0.0
    return rec
