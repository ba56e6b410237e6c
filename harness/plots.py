"""`reports/pareto.png`: perplexity against bits per weight, one panel per model and evaluation protocol."""

from __future__ import annotations

from pathlib import Path

from harness.report import _frame, _section_order, _whole_split
from methods.core.atomic import atomic_write


def plot_pareto(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = _frame(records)
    frame = frame[(frame.status == "FINISHED") & frame.ppl.notna() & frame.bpw.notna()]
    groups = sorted(frame.groupby(["model", "protocol"]), key=_section_order) if len(frame) else []
    # One colour per method label across all panels, one legend under them (labels can be long: they name
    # every non-default parameter), panels two to a row.
    methods = sorted(frame.method.unique()) if len(frame) else []
    colours = {m: plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")(i) for i, m in enumerate(methods)}
    cols = min(2, max(1, len(groups)))
    rows_n = max(1, -(-len(groups) // cols))
    legend_in = 0.25 * -(-len(methods) // 2) + 0.3 if methods else 0.0
    fig, axes = plt.subplots(rows_n, cols, figsize=(7.5 * cols, 5 * rows_n + legend_in), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, ((model, _), group) in zip(axes.flat, groups, strict=False):
        for method, rows in sorted(group.groupby("method")):
            ax.scatter(rows.bpw, rows.ppl, label=method, color=colours[method])
            for row in rows.itertuples():
                ax.annotate(row.bits, (row.bpw, row.ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (quantized linears, incl. scales/zeros)")
        ax.set_ylabel("WikiText-2 perplexity (log)")
        windows = group.p_ppl_max_windows.iloc[0]
        split = "whole test split" if _whole_split(windows) else f"first {windows} windows"
        zeroshot = group.p_zs_tasks.iloc[0] not in ("[]", None)
        ax.set_title(f"{model} ({split}{', runs with zero-shot tasks' if zeroshot else ''})")
        ax.grid(True, which="both", alpha=0.3)
    if methods:
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[m], label=m) for m in methods]
        fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9, frameon=False)
        fig.tight_layout(rect=(0, legend_in / (5 * rows_n + legend_in), 1, 1))
    else:
        fig.tight_layout()
    _save(fig, path)


def paretoq_points(records: list[dict], model: str = "smollm2-135m") -> list[tuple[str, float, float]]:
    """(bits, true bits/weight, PPL) of the finished whole-split ParetoQ runs of `model`, plus its FP row."""
    frame = _frame(records)
    frame = frame[(frame.status == "FINISHED") & frame.ppl.notna() & (frame.model == model)]
    frame = frame.loc[frame.p_ppl_max_windows.map(_whole_split).astype(bool)]
    chosen = frame[frame.method.str.startswith("paretoq")]
    fp = frame[(frame.bits == "w16a16kv16") & frame.method.str.startswith("rtn")]
    rows = [(r.bits, float(r.bpw), float(r.ppl)) for r in chosen.itertuples()]
    rows += [(r.bits, 16.0, float(r.ppl)) for r in fp.head(1).itertuples()]
    return sorted(rows, key=lambda row: row[1])


def plot_paretoq(records: list[dict], claims: dict, path: Path) -> bool:
    """`reports/paretoq.png`: WikiText-2 PPL against bits per weight — ours (SmolLM2-135M, the qat-cpu budget, true
    bits/weight incl. scales) beside the paper's MobileLLM-125M numbers (nominal bits). False if no ParetoQ run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = paretoq_points(records)
    if not any(bits != "w16a16kv16" for bits, _, _ in ours):
        return False
    paper = sorted((float(bits), float(ppl)) for bits, ppl in claims["wikitext2_ppl"].items())
    paper_fp = [ppl for bits, ppl in paper if bits >= 16]
    paper = [(bits, ppl) for bits, ppl in paper if bits < 16]
    ours_fp = [ppl for bits, _, ppl in ours if bits == "w16a16kv16"]
    ours = [row for row in ours if row[0] != "w16a16kv16"]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(
        [b for b, _ in paper],
        [p for _, p in paper],
        "s--",
        color="tab:gray",
        label=f"paper: {claims['model']} (far larger QAT budget)",
    )
    ax.plot(
        [b for _, b, _ in ours],
        [p for _, _, p in ours],
        "o-",
        color="tab:blue",
        label="ours: SmolLM2-135M, budget qat-cpu (131k training tokens at <= 2 bit)",
    )
    for fp, colour, who in ((paper_fp, "tab:gray", "paper"), (ours_fp, "tab:blue", "ours")):
        if fp:
            ax.axhline(fp[0], color=colour, linestyle=":", linewidth=1, label=f"{who}: 16-bit ({fp[0]:.1f})")
    for bits, bpw, ppl in ours:
        ax.annotate(bits.split("a")[0], (bpw, ppl), fontsize=8, xytext=(4, 4), textcoords="offset points")
    for bits, ppl in paper:
        ax.annotate(f"{bits:g}", (bits, ppl), fontsize=8, color="tab:gray", xytext=(4, -10), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (ours: true, incl. scales; paper: nominal)")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title(f"{claims['paper']}: PPL vs bits, whole WikiText-2 test split")
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    _save(fig, path)
    return True


def _save(fig, path: Path) -> None:
    """PNG written atomically (a full disk leaves the previous plot), then the figure closed."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None}))
    finally:
        plt.close(fig)
