"""`reports/pareto.png`: perplexity against bits per weight, one panel per model and evaluation protocol."""

from __future__ import annotations

from pathlib import Path

from harness.report import _frame, _section_order, _whole_split


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
        split = "whole test split" if _whole_split(windows) else f"first {windows} windows"
        zeroshot = group.p_zs_tasks.iloc[0] not in ("[]", None)
        ax.set_title(f"{model} ({split}{', runs with zero-shot tasks' if zeroshot else ''})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
