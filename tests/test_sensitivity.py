"""Per-block sensitivity: one row per decoder block, zero KL when nothing is quantized, positive when blocks are,
a refusal for rotated methods, CSV and plot written."""

import csv

import pytest
from hydra import compose, initialize_config_dir

from harness.cli_sweep import CONF_DIR
from harness.runner import spec_from_config
from harness.sensitivity import NotSeparable, block_sensitivity, write_outputs


def _spec(bits: str, method: str, data_dir: str):
    overrides = [f"method={method}", "model=tiny-llama", f"bits={bits}", "budget=smoke", "calib.seqlen=64"]
    overrides += ["eval.ppl.seqlen=64", f"data_dir={data_dir}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return spec_from_config(compose("config", overrides=overrides))


def test_blocks_rank_by_kl_and_outputs_are_written(data_dir, tmp_path):
    fp_row, rows = block_sensitivity(_spec("w2a16kv16", "rtn", data_dir), windows=2)
    assert [row["block"] for row in rows] == [0, 1]
    assert all(row["kl_vs_fp"] > 0 and row["top1_vs_fp"] <= 1 for row in rows)
    csv_path, png_path = write_outputs("tiny-rtn-w2", fp_row, rows, tmp_path)
    assert len(list(csv.DictReader(csv_path.open()))) == 3 and png_path.stat().st_size > 0


def test_nothing_quantized_means_no_divergence(data_dir):
    fp_row, rows = block_sensitivity(_spec("w16a16kv16", "rtn", data_dir), windows=2)
    assert all(abs(row["kl_vs_fp"]) < 1e-5 and row["top1_vs_fp"] == 1.0 for row in rows)
    assert all(abs(row["ppl"] - fp_row["ppl"]) < 1e-3 * fp_row["ppl"] for row in rows)


def test_a_rotating_method_is_refused(data_dir):
    with pytest.raises(NotSeparable, match="rotated residual stream"):
        block_sensitivity(_spec("w4a16kv16", "quarot", data_dir), windows=1)
