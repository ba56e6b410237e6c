"""The leaderboard's "ours vs maintained peers" section (harness/peers.py): a peer run and ours pair only at
identical settings, and the row carries both PPLs, the gap, the paired test and both quantize times."""

import copy

from harness.peers import peer_crosscheck
from harness.records import read_records
from harness.report import render_leaderboard
from harness.rerun import RECORDS


def _gptq_record() -> dict:
    found = [r for r in read_records(RECORDS) if r["method"] == "gptq" and r["status"] == "FINISHED"]
    return copy.deepcopy(found[0])


def _peer_of(ours: dict, ppl_factor: float, seconds: float) -> dict:
    peer = copy.deepcopy(ours)
    peer["method"], peer["run_key"], peer["run_id"] = "gptq_llmc", "peer", "peer-run"
    shared = ("w_sym", "act_order", "damp", "block_size")
    peer["method_params"] = {name: ours["method_params"][name] for name in shared}
    name = f"{ours['protocol']['ppl_dataset']}_ppl"
    peer["metrics"] = {**ours["metrics"], name: ours["metrics"][name] * ppl_factor, "quantize_seconds": seconds}
    peer["window_nll"] = [nll + 0.01 + 0.001 * (i % 3) for i, nll in enumerate(ours["window_nll"])]
    return peer


def test_a_peer_at_identical_settings_gets_a_row_with_gap_test_and_times():
    ours = _gptq_record()
    ours["metrics"]["quantize_seconds"] = 100.0
    lines = peer_crosscheck([ours, _peer_of(ours, 1.01, 250.0)])
    assert lines[0] == "## Ours vs maintained peers at identical settings"
    (row,) = [line for line in lines if line.startswith(f"| {ours['model']} |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2] == "gptq vs gptq_llmc" and "damp=" in cells[3] and "calib_batch_size" not in cells[3]
    assert cells[6] == "+1.00%" and float(cells[7]) < 1e-6  # every window 0.01-0.012 nats worse: separable
    assert cells[8:] == ["100", "250", "0.40×"]


def test_a_peer_differing_in_a_shared_parameter_or_the_protocol_is_not_paired():
    ours = _gptq_record()
    peer = _peer_of(ours, 1.0, 1.0)
    peer["method_params"]["damp"] = "0.1"
    assert peer_crosscheck([ours, peer]) == []
    peer = _peer_of(ours, 1.0, 1.0)
    peer["protocol"] = {**peer["protocol"], "calib_nsamples": "128"}
    assert peer_crosscheck([ours, peer]) == []


def test_the_section_closes_the_leaderboard_only_when_a_pair_exists():
    ours = _gptq_record()
    assert "maintained peers" not in render_leaderboard([ours])
    assert render_leaderboard([ours, _peer_of(ours, 1.0, 1.0)]).count("## Ours vs maintained peers") == 1
