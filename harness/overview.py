"""A protocol section's summary tables: perplexity at a glance (bit settings × methods, seeds as mean ± CI,
ties by a paired test) and the seed spread set against the gaps between methods (issue 19 item 2)."""

from __future__ import annotations

import re

import pandas as pd

from harness.spec import BitSpec
from harness.stats import SIGNIFICANCE, mean_ci, paired_p_value, welch_p_value


def bits_order(bits: str) -> tuple:
    spec = BitSpec.parse(bits)
    return (-spec.w, -spec.a, -spec.kv, -(spec.group or 10**9))


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:,.{digits}f}"


def _finished_cells(group: pd.DataFrame) -> pd.DataFrame:
    """A section's FINISHED runs with a PPL, each with its overview `column`: the method label, plus the
    calibration (windows × tokens) where the method ran at two budgets for one setting."""
    done = group[(group.status == "FINISHED") & group.ppl.notna()].copy()
    if done.empty:
        return done
    budgets = done.groupby(["method", "bits"]).calib.nunique()
    two_budgets = set(budgets[budgets > 1].index.get_level_values(0))
    done["column"] = [f"{m} [{c}]" if m in two_budgets else m for m, c in zip(done.method, done.calib, strict=True)]
    return done


def ppl_overview(group: pd.DataFrame) -> list[str]:
    """One protocol section at a glance: bit settings × methods (a method with its act/KV plug-ins is one column),
    WikiText-2 PPL of FINISHED runs, the lowest per setting in bold. A cell shows the method's best variant at that
    setting (lowest mean PPL over its options and calibration budgets); a superscript names it when it is not the
    plain method, and the setting's own table lists every run. Runs of one variant at several seeds are one value,
    mean ± 95% CI; a cell marked ≈ is not significantly different from the setting's best (paired t-test over
    the evaluation windows' NLL, p ≥ 0.05)."""
    done = _finished_cells(group)
    if done.empty:
        return []
    methods = sorted({_method_of(column) for column in done.column})
    lines = [
        "### Perplexity at a glance",
        "",
        "| bits | " + " | ".join(methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    seeds_shown = ties_shown = False
    variants: dict[str, int] = {}  # variant label -> its footnote number, in order of first appearance
    for bits in sorted(done.bits.unique(), key=bits_order):
        cells = {column: _overview_cell(runs) for column, runs in done[done.bits == bits].groupby("column")}
        shown: dict[str, str] = {}  # method -> its best variant's column
        for column in sorted(cells, key=lambda column: (cells[column][0], column)):
            shown.setdefault(_method_of(column), column)
        best = min(shown.values(), key=lambda column: (cells[column][0], column)) if len(shown) > 1 else None
        texts = []
        for method in methods:
            if method not in shown:
                texts.append("–")
                continue
            column = shown[method]
            mean, text, nll = cells[column]
            seeds_shown |= "±" in text
            tie = False
            if best is not None and fmt(mean) == fmt(cells[best][0]):
                text = f"**{text}**"  # ties at the shown precision are all bold
            elif best is not None and paired_p_value(nll, cells[best][2]) >= SIGNIFICANCE:
                tie = ties_shown = True
            if column != method:
                text += _superscript(variants.setdefault(column, len(variants) + 1))
            texts.append(text + (" ≈" if tie else ""))
        lines.append(f"| `{bits}` | " + " | ".join(texts) + " |")
    notes = []
    if variants:
        named = "; ".join(f"{_superscript(number)} {column}" for column, number in variants.items())
        notes.append(f"Each cell is the method's best variant at that setting: {named}")
    if seeds_shown:
        notes.append("± = 95% confidence interval of the mean over seeds (Student's t), number of seeds in brackets")
    if ties_shown:
        notes.append(
            f"≈ = not significantly different from the row's best (paired t-test over windows, p ≥ {SIGNIFICANCE})"
        )
    return lines + [""] + ([f"*{'; '.join(notes)}.*", ""] if notes else [])


def _superscript(number: int) -> str:
    return str(number).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))


def _overview_cell(runs: pd.DataFrame) -> tuple[float, str, list[float]]:
    """(mean PPL, cell text, per-window NLL averaged over the runs' seeds — [] when not logged)."""
    ppls = [float(p) for p in runs.ppl]
    mean, half = mean_ci(ppls)
    text = fmt(mean) if len(ppls) == 1 else f"{fmt(mean)} ± {fmt(half)} ({len(ppls)})"
    series = [s for s in runs.window_nll if isinstance(s, list) and s]
    nll = (
        [sum(values) / len(values) for values in zip(*series, strict=True)]
        if series and len(series) == len(ppls) and len({len(s) for s in series}) == 1
        else []
    )
    return mean, text, nll


def seed_spread(group: pd.DataFrame) -> list[str]:
    """Each cell of the overview that holds several seeds, set against the nearest other method: the spread of its
    PPL over seeds (max − min) and the gap between its mean and the closest mean PPL of another method's column at
    the same bit setting (variants of the same method — options, calibration budgets — are not other methods). A
    gap smaller than the spread means the order of those two methods is within seed noise. Where the nearest other
    method has several seeds too, Welch's t-test between the two seed sets gives the p-value of that gap."""
    done = _finished_cells(group)
    if done.empty or done.groupby(["bits", "column"]).p_seed.nunique().max() < 2:
        return []
    lines = [
        "### Seed spread against the gaps between methods",
        "",
        "| bits | method | seeds | PPL over seeds (min – max) | spread | nearest other method | gap in mean PPL "
        "| gap ÷ spread | Welch p |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for bits in sorted(done.bits.unique(), key=bits_order):
        means = {column: float(runs.ppl.mean()) for column, runs in done[done.bits == bits].groupby("column")}
        for column, runs in done[done.bits == bits].groupby("column"):
            if runs.p_seed.nunique() < 2:
                continue
            low, high = float(runs.ppl.min()), float(runs.ppl.max())
            spread = high - low
            others = {other: mean for other, mean in means.items() if _method_of(other) != _method_of(column)}
            if others:
                nearest = min(others, key=lambda other: (abs(others[other] - means[column]), other))
                gap = abs(others[nearest] - means[column])
                ratio = "–" if spread == 0 else f"{gap / spread:,.2f}×"
                neighbour, gap_text = f"{nearest} ({fmt(others[nearest])})", fmt(gap)
                other_ppls = done[(done.bits == bits) & (done.column == nearest)].ppl
                p_value = welch_p_value([float(p) for p in runs.ppl], [float(p) for p in other_ppls])
                welch = "–" if p_value != p_value else f"{p_value:.3f}"
            else:
                neighbour, gap_text, ratio, welch = "–", "–", "–", "–"
            lines.append(
                f"| `{bits}` | {column} | {runs.p_seed.nunique()} | {fmt(low)} – {fmt(high)} | {fmt(spread)} | "
                f"{neighbour} | {gap_text} | {ratio} | {welch} |"
            )
    note = (
        "*Below 1× the two methods' order is within the seed spread. Welch p: Welch's t-test between the two "
        f"methods' PPL over seeds (– where the other method has one run); p ≥ {SIGNIFICANCE} = no significant gap.*"
    )
    return lines + ["", note, ""]


def _method_of(column: str) -> str:
    """The method (with its act/KV plug-ins) of an overview column, without options or calibration budget:
    "bcq (n_codebooks=1) + act=bcq (n_codebooks=1) [16 × 2048]" -> "bcq + act=bcq"."""
    return re.sub(r" \([^)]*\)", "", column).split(" [")[0]
