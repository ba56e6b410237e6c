from pathlib import Path

import pytest

from harness import data
from harness.models import byte_tokenizer
from harness.spec import CalibSpec, SpecError


def test_wikitext_rows_match_hub_layout(data_dir):
    rows = data.wikitext2_rows("test", data_dir)
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n" and rows[2] == ""
    assert all(row == "" or row.endswith("\n") for row in rows)


def test_missing_mirror_names_both_fixes(tmp_path):
    with pytest.raises(data.DataUnavailable) as err:
        data.wikitext2_rows("test", str(tmp_path))
    message = str(err.value)
    assert "QUANTBENCH_DATA" in message and "hub" in message and "\n" not in message


def test_calibration_windows_are_seeded(data_dir):
    tok = byte_tokenizer()
    spec = CalibSpec("wikitext2-valid", nsamples=3, seqlen=64)
    first = data.calibration_windows(spec, tok, seed=0, data_dir=data_dir)
    again = data.calibration_windows(spec, tok, seed=0, data_dir=data_dir)
    other = data.calibration_windows(spec, tok, seed=1, data_dir=data_dir)
    assert [w.shape for w in first] == [(1, 64)] * 3
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    assert any((a != b).any() for a, b in zip(first, other, strict=True))


def test_unknown_calibration_dataset():
    with pytest.raises(SpecError, match="valid: wikitext2-valid"):
        data.check_calib_spec(CalibSpec("c5"))


def test_a_relative_mirror_path_survives_a_change_of_directory(data_dir, tmp_path, monkeypatch):
    """`export QUANTBENCH_DATA=../shared/data` (the README's) must still work in a job started elsewhere."""
    import os

    monkeypatch.chdir(Path(data_dir).parent)
    monkeypatch.setenv(data.DATA_ENV, os.path.join(".", Path(data_dir).name))
    data.absolute_mirror_env()
    monkeypatch.chdir(tmp_path)
    assert Path(os.environ[data.DATA_ENV]).is_absolute()
    assert data.wikitext2_rows("test")[:3] == data.wikitext2_rows("test", data_dir)[:3]
