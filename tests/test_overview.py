"""The perplexity-at-a-glance table and the seed-spread table (harness/overview.py)."""

from harness.report import render_leaderboard
from tests.records_fixture import PROTOCOL, QUAROT_NOW, _record


def test_overview_pivots_settings_by_method_and_bolds_the_best():
    records = [
        _record("fp", "rtn", "w16a16kv16", 10.0),
        _record("g3", "gptq", "w3g128a16kv16", 12.0),
        _record("r3", "rtn", "w3g128a16kv16", 15.0),
        _record("q3", "quarot", "w3g128a16kv16", 11.0, params={"weights": "rtn", **QUAROT_NOW}),
        _record("r2", "rtn", "w2a4kv4", 900.0),
        _record("g2", "gptq", "w2a4kv4", None, status="FAILED", error="boom"),
    ]
    board = render_leaderboard(records)
    overview = board[board.index("### Perplexity at a glance") : board.index("### `w16a16kv16`")]
    lines = overview.splitlines()
    assert lines[2] == "| bits | gptq | quarot | rtn |"
    assert "| `w16a16kv16` | – | – | 10.00 |" in lines
    assert "| `w3g128a16kv16` | 12.00 | **11.00**¹ | 15.00 |" in lines  # a variant: footnoted
    assert "¹ quarot (weights=rtn)" in overview
    assert "| `w2a4kv4` | – | – | 900.00 |" in lines  # the failed GPTQ run is not a number


def test_overview_shows_a_methods_best_variant_in_one_column_and_names_it():
    """Two calibration budgets and an option of one method, and a plug-in method with and without options: one
    column per method (with its plug-ins), the best variant's value, a footnote naming it."""
    small, big = _record("g16", "gptq", "w4g128a16kv16", 31.0), _record("g128", "gptq", "w4g128a16kv16", 30.0)
    small["metrics"]["calib_windows"], big["metrics"]["calib_windows"] = 16.0, 128.0
    option = _record("gd", "gptq", "w4g128a16kv16", 29.0, params={"damp": "0.1"})
    option["metrics"]["calib_windows"] = 16.0
    bcq = _record("b", "bcq", "w4a4kv16", 40.0)
    bcq_one = _record("b1", "bcq", "w4a4kv16", 39.0, params={"n_codebooks": "1"})
    for rec in (bcq, bcq_one):
        rec["act"] = {"name": "bcq", "n_codebooks": rec["method_params"].get("n_codebooks", "2")}
    board = render_leaderboard([small, big, option, bcq, bcq_one])
    overview = board[board.index("### Perplexity at a glance") : board.index("### `w4g128a16kv16`")]
    assert "| bits | bcq + act=bcq | gptq |" in overview
    assert "| `w4g128a16kv16` | – | 29.00¹ |" in overview
    assert "| `w4a4kv16` | 39.00² | – |" in overview
    assert "¹ gptq (damp=0.1, " in overview and "; ² bcq (n_codebooks=1) + act=bcq (n_codebooks=1)." in overview
    assert "| gptq [128 × 2048] |" not in overview and "31.00" not in overview  # in the setting's table only


def test_seeds_are_one_cell_with_a_confidence_interval_and_ties_are_marked():
    """Three seeds of one method: mean ± 95% CI (t with 2 df); a method not significantly different from the
    best over paired windows is marked ≈, a clearly worse one is not."""
    import random

    rng = random.Random(0)
    base = [3.0 + 0.2 * rng.random() for _ in range(40)]
    records = [_record("fp", "rtn", "w16a16kv16", 20.0)]
    for seed, ppl in enumerate((30.0, 32.0, 34.0)):
        rec = _record(f"q{seed}", "quarot", "w4a4kv4", ppl, start=seed + 2)
        rec["protocol"] = {**PROTOCOL, "seed": str(seed)}
        rec["window_nll"] = [b + 0.01 * seed for b in base]
        records.append(rec)
    close = _record("g", "gptq", "w4a4kv4", 32.1, start=9)
    close["window_nll"] = [b + 0.01 + rng.gauss(0, 0.05) for b in base]
    worse = _record("r", "rtn", "w4a4kv4", 60.0, start=10)
    worse["window_nll"] = [b + 0.5 + rng.gauss(0, 0.01) for b in base]
    text = render_leaderboard(records + [close, worse])
    row = next(line for line in text.splitlines() if line.startswith("| `w4a4kv4` |"))
    assert "**32.00 ± 4.97 (3)**" in row  # mean 32, s = 2, t(0.975, 2) = 4.303: 4.303 * 2 / sqrt(3)
    assert "32.10 ≈" in row and "60.00 |" in row and "60.00 ≈" not in row
    assert "± = 95% confidence interval" in text and "≈ = not significantly different" in text
    assert "| quarot (seed 1) |" in text  # the per-setting table keeps every seed's row


def test_seed_spread_is_set_against_the_nearest_other_method_not_a_variant_of_the_same_one():
    """quarot at seeds 0-2 (30, 32, 34: spread 4, mean 32); its own variant at 32.5 is not another method; gptq at
    35 is the nearest other method (gap 3, 0.75 of the spread: within seed noise), rtn at 60 is farther."""
    records = [_record("fp", "rtn", "w16a16kv16", 20.0)]
    for seed, ppl in enumerate((30.0, 32.0, 34.0)):
        rec = _record(f"q{seed}", "quarot", "w4a4kv4", ppl, start=seed + 2)
        rec["protocol"] = {**PROTOCOL, "seed": str(seed)}
        records.append(rec)
    records.append(_record("qv", "quarot", "w4a4kv4", 32.5, params={**QUAROT_NOW, "weights": "rtn"}))
    records += [_record("g", "gptq", "w4a4kv4", 35.0), _record("r", "rtn", "w4a4kv4", 60.0)]
    text = render_leaderboard(records)
    assert "### Seed spread against the gaps between methods" in text
    rows = [line for line in text.splitlines() if line.startswith("| `w4a4kv4` | quarot |")]
    assert rows == ["| `w4a4kv4` | quarot | 3 | 30.00 – 34.00 | 4.00 | gptq (35.00) | 3.00 | 0.75× | – |"]
    assert "Seed spread" not in render_leaderboard(records[:1] + records[4:])  # one seed per column: no table
    for seed, ppl in enumerate((35.0, 36.0, 37.0)):  # gptq at three seeds: Welch's t between the seed sets
        rec = _record(f"g{seed}", "gptq", "w4a4kv4", ppl, start=seed + 20)
        rec["protocol"] = {**PROTOCOL, "seed": str(seed)}
        records.append(rec)
    text = render_leaderboard([r for r in records if r["run_key"] != "g"])
    row = next(line for line in text.splitlines() if line.startswith("| `w4a4kv4` | quarot |"))
    # means 32 vs 36, variances 4 and 1: t = 4 / sqrt(5/3) = 3.10, Welch-Satterthwaite df = 2.94, p = 0.055
    assert row.endswith("| gptq (36.00) | 4.00 | 1.00× | 0.055 |")
