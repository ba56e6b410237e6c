"""The contamination guard: 13-gram overlap of calibration/training text with the evaluation split."""

from harness import contamination


def test_overlap_counts_shared_13_grams_of_words():
    words = [f"w{i}" for i in range(14)]  # 14 words: two 13-grams
    evaluated = " ".join(words)
    assert contamination.overlap(evaluated, evaluated).fraction == 1.0
    assert contamination.overlap("something else entirely", evaluated).fraction == 0.0
    first_only = " ".join(words[:13]).upper().replace(" ", ", ")  # case and punctuation do not matter
    found = contamination.overlap(first_only, evaluated)
    assert (found.eval_ngrams, found.shared, found.fraction) == (2, 1, 0.5)
    assert contamination.overlap(evaluated, " ".join(words[:12])).eval_ngrams == 0  # shorter than one 13-gram


def test_the_validation_split_barely_overlaps_the_test_split_and_a_leak_is_flagged(data_dir, monkeypatch):
    metrics, warnings = contamination.run_metrics({"calib": "wikitext2-valid"}, "wikitext2", data_dir)
    assert 0 <= metrics["contamination.calib_13gram"] < contamination.WARN_FRACTION and warnings == {}
    leak = contamination.Overlap(eval_ngrams=1000, shared=50)
    monkeypatch.setattr(contamination, "corpus_overlap", lambda *args: leak)
    metrics, warnings = contamination.run_metrics({"train": "wikitext2-valid"}, "wikitext2", data_dir)
    assert metrics == {"contamination.train_13gram": 0.05}
    assert warnings == {
        "contamination.train_warning": "5.00% of the wikitext2 test split's 13-grams occur in wikitext2-valid"
    }


def test_a_run_logs_the_overlap_of_the_corpus_it_read(tmp_path, data_dir):
    from hydra import compose, initialize_config_dir

    from harness.cli_sweep import CONF_DIR
    from harness.records import export_records
    from harness.report import render_leaderboard
    from harness.runner import execute, spec_from_config
    from harness.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for method in ("gptq", "rtn"):  # GPTQ reads calibration windows, RTN reads nothing
        overrides = [
            "model=tiny-llama",
            "budget=smoke",
            "eval.ppl.seqlen=256",
            "calib.dataset=c4-exllamav2",  # 0.3 MB of text: the byte tokenizer is slow on more
            f"method={method}",
            f"data_dir={data_dir}",
        ]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, "bits=w4a16kv16"])
        assert execute(spec_from_config(cfg), cfg, Tracker(uri)).status == "finished"
    records = {r["method"]: r for r in export_records(uri, "quantbench")}
    assert records["gptq"]["metrics"]["contamination.calib_13gram"] == 0.0
    assert "contamination.calib_13gram" not in records["rtn"]["metrics"]
    board = render_leaderboard(list(records.values()))
    assert "- Contamination guard: share of the test split's distinct 13-grams" in board
    assert "calibration text at most 0.000% (1 runs)" in board
