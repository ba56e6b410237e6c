"""The leaderboard's "ours vs maintained peers" section (issue 46): each of our methods beside the maintained
library that implements the same algorithm, at identical settings — same model, bits, evaluation protocol,
calibration windows and every method parameter the two share — so a gap is a difference of code, not of setup.

Per pair: both PPLs (ours as the mean over seeds where several ran, with min – max), the relative gap, the paired
t-test over the evaluation windows' NLLs (same windows in both runs; first seed of ours), and both quantize times.
Those times come from separate runs (possibly separate sessions and loads); `python -m harness bench quantize
--method <peer> --against <ours>` times the two in one process, which is what a speed claim should cite."""

from __future__ import annotations

import json

from harness.overview import fmt
from harness.stats import paired_p_value

# peer method -> our method implementing the same algorithm
PEERS = {"gptq_llmc": "gptq"}


def _setting(rec: dict) -> str:
    protocol = {k: v for k, v in rec["protocol"].items() if k != "seed"}
    return json.dumps([rec["model"], rec["bits"], rec.get("act"), rec.get("kv"), protocol], sort_keys=True)


def _shared_params_equal(peer: dict, ours: dict) -> bool:
    shared = set(peer["method_params"]) & set(ours["method_params"])
    return all(peer["method_params"][name] == ours["method_params"][name] for name in shared)


def _ppl(rec: dict) -> float | None:
    return rec["metrics"].get(f"{rec['protocol']['ppl_dataset']}_ppl")


def peer_crosscheck(records: list[dict]) -> list[str]:
    """The section's lines; none when no peer run has a run of ours at identical settings."""
    finished = [r for r in records if r["status"] == "FINISHED" and _ppl(r) is not None]
    rows = []
    for peer_method, our_method in sorted(PEERS.items()):
        for peer in (r for r in finished if r["method"] == peer_method):
            ours = [
                r
                for r in finished
                if r["method"] == our_method and _setting(r) == _setting(peer) and _shared_params_equal(peer, r)
            ]
            if not ours:
                continue
            ours.sort(key=lambda r: int(r["protocol"].get("seed", 0)))
            our_ppls = [_ppl(r) for r in ours]
            mean = sum(our_ppls) / len(our_ppls)
            spread = f" ({fmt(min(our_ppls))} – {fmt(max(our_ppls))}, {len(ours)} seeds)" if len(ours) > 1 else ""
            p_value = paired_p_value(peer.get("window_nll") or [], ours[0].get("window_nll") or [])
            shared = sorted(set(peer["method_params"]) & set(ours[0]["method_params"]))
            settings = ", ".join(f"{name}={peer['method_params'][name]}" for name in shared)
            our_seconds = ours[0]["metrics"].get("quantize_seconds")
            peer_seconds = peer["metrics"].get("quantize_seconds")
            ratio = fmt(our_seconds / peer_seconds) + "×" if our_seconds and peer_seconds else "–"
            rows.append(
                f"| {peer['model']} | `{peer['bits']}` | {our_method} vs {peer_method} | {settings} | "
                f"{fmt(mean)}{spread} | {fmt(_ppl(peer))} | {100 * (_ppl(peer) / mean - 1):+.2f}% | "
                f"{'–' if p_value != p_value else f'{p_value:.2g}'} | {fmt(our_seconds, 0)} | {fmt(peer_seconds, 0)} | "
                f"{ratio} |"
            )
    if not rows:
        return []
    return [
        "## Ours vs maintained peers at identical settings",
        "",
        "Each of our methods beside the maintained library implementing the same algorithm: same model, bits, "
        "protocol, calibration windows and shared method parameters (listed). Δ is the peer's PPL against ours; the "
        "paired p is the t-test over the evaluation windows' NLLs. Quantize times come from separate runs: "
        "`python -m harness bench quantize --method <peer> --against <ours>` times both in one process.",
        "",
        "| model | bits | pair | shared settings | ours PPL | peer PPL | Δ | paired p | ours quantize s "
        "| peer quantize s | ours ÷ peer time |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
