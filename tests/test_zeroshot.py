"""Zero-shot through lm-eval: the mirror's tasks build the same requests as the registered tasks."""

import ast
import json
import math
import os
from pathlib import Path

import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks.hellaswag.utils import preprocess
from lm_eval.utils import apply_template
from torch import nn

from harness.evaluate import steps
from harness.evaluate import zeroshot as zs
from harness.evaluate.zeroshot import (
    ScoreCache,
    TaskScore,
    TaskUnavailable,
    evaluate_zeroshot,
    mirror_config,
    model_fingerprint,
    registered_config,
)
from harness.spec import BitSpec, CalibSpec, ModelSpec, PerplexitySpec, RunSpec, ZeroShotSpec


def _render(reg: dict, field: str, doc: dict):
    value = reg[field]
    if isinstance(value, list):
        return value
    return value(doc) if callable(value) else apply_template(value, doc)


def _expected(task: str, doc: dict) -> list[tuple[str, str]]:
    """Requests from the registered task's own templates/functions (lm-eval's request layout)."""
    reg = registered_config(task)
    delim = reg.get("target_delimiter", " ")
    if reg["output_type"] == "loglikelihood":
        return [(_render(reg, "doc_to_text", doc), _render(reg, "doc_to_target", doc))]
    if task == "winogrande":  # multiple inputs: one context per option, one shared continuation
        return [(ctx, delim + _render(reg, "doc_to_target", doc)) for ctx in _render(reg, "doc_to_choice", doc)]
    choices = _render(reg, "doc_to_choice", doc)
    choices = ast.literal_eval(choices) if isinstance(choices, str) else choices
    return [(_render(reg, "doc_to_text", doc), delim + choice) for choice in choices]


@pytest.mark.parametrize("task", ["piqa", "arc_easy", "arc_challenge", "winogrande", "lambada_openai", "boolq"])
def test_mirror_requests_equal_registered_processing(task, data_dir):
    mirrored = ConfigurableTask(config=mirror_config(task, Path(data_dir)))
    mirrored.build_all_requests(limit=4, rank=0, world_size=1)
    docs = list(mirrored.eval_docs)[:4]
    built = {}
    for inst in mirrored.instances:
        built.setdefault(inst.doc_id, []).append(tuple(inst.arguments))
    assert len(built) == 4
    for doc_id, doc in enumerate(docs):
        assert built[doc_id] == _expected(task, doc), (task, doc_id)


def test_hellaswag_mirror_is_named_apart_and_uses_lm_eval_preprocess(data_dir):
    cfg = mirror_config("hellaswag", Path(data_dir))
    assert cfg["task"] == "hellaswag_mirror"
    task = ConfigurableTask(config=cfg)
    doc = list(task.eval_docs)[0]
    assert doc["query"] == preprocess(doc["activity_label"] + ": " + doc["ctx"])
    assert doc["choices"] == [preprocess(e) for e in doc["endings"]] and doc["gold"] == int(doc["label"])


def test_unmirrored_task_names_both_fixes(data_dir):
    with pytest.raises(TaskUnavailable) as err:
        mirror_config("mmlu", Path(data_dir))
    message = str(err.value)
    assert "QUANTBENCH_DATA" in message and "hub" in message and "\n" not in message


def test_tiny_llama_one_task_through_the_full_path(tiny, data_dir):
    model, tok = tiny
    (score,) = evaluate_zeroshot(model, tok, ["arc_easy"], data_dir, batch_size=4, limit=6)
    assert score.task == "arc_easy" and score.metric == "acc_norm"
    assert 0.0 <= score.value <= 1.0 and score.stderr is not None
    assert {"acc", "acc_norm", "acc_stderr"} <= set(score.all_metrics)
    assert len(score.config_hash) == 16


def _score(task: str, value: float) -> TaskScore:
    return TaskScore(task, "acc", value, 0.01, {"acc": value, "acc_stderr": 0.01}, "0" * 16, 1.5)


def test_score_cache_keeps_tasks_only_for_the_same_fingerprint(tmp_path):
    cache = ScoreCache(tmp_path / "zs", "key", "model-a")
    assert cache.load() == {}
    cache.save("piqa", _score("piqa", 0.61))
    cache.save("hellaswag", _score("hellaswag_mirror", 0.42))
    assert cache.load() == {"piqa": _score("piqa", 0.61), "hellaswag": _score("hellaswag_mirror", 0.42)}
    assert ScoreCache(tmp_path / "zs", "key", "model-b").load() == {}
    assert ScoreCache(tmp_path / "zs", "other-key", "model-a").load() == {}
    cache.path.write_text("{truncated")
    assert cache.load() == {}
    Path(f"{cache.request_prefix}_rank0.db").write_bytes(b"")
    cache.clear()
    assert list((tmp_path / "zs").iterdir()) == []


def test_a_task_in_flight_carries_its_earlier_attempts_time(tmp_path):
    """Seconds of an interrupted task = from each attempt's start to the response cache's last write."""
    cache = ScoreCache(tmp_path, "key", "model-a")
    assert cache.start("hellaswag") == 0.0
    started = json.loads(cache.path.read_text())["in_flight"]["started_at"]
    db = Path(f"{cache.request_prefix}_rank0.db")
    db.write_bytes(b"")
    os.utime(db, (started + 600.0, started + 600.0))  # the killed attempt wrote its last response 600 s in
    assert cache.start("hellaswag") == pytest.approx(600.0)  # started again: carried
    second = json.loads(cache.path.read_text())["in_flight"]["started_at"]
    os.utime(db, (second + 30.0, second + 30.0))
    assert cache.start("hellaswag") == pytest.approx(630.0)  # killed twice: both attempts count
    assert cache.start("arc_easy") == 0.0  # another task in flight: nothing carried
    cache.save("arc_easy", _score("arc_easy", 0.5))
    assert "in_flight" not in json.loads(cache.path.read_text())


def test_fingerprint_sees_one_window_change_in_the_last_bit():
    nll = [3.1, 2.9, 3.05]
    moved = [3.1, 2.9, math.nextafter(3.05, 4.0)]  # one ulp
    assert moved != nll
    assert model_fingerprint("k", nll) == model_fingerprint("k", list(nll))
    assert model_fingerprint("k", nll) != model_fingerprint("k", moved)
    assert model_fingerprint("k", nll) != model_fingerprint("other", nll)


def test_finished_tasks_are_reused_and_the_task_in_flight_resumes_from_cached_responses(tiny, data_dir, tmp_path):
    model, tok = tiny
    cache = ScoreCache(tmp_path, "key", "model-a")
    cache.save("arc_easy", _score("arc_easy", -1.0))  # no real score is negative: shows it was not recomputed
    first, piqa = evaluate_zeroshot(model, tok, ["arc_easy", "piqa"], data_dir, batch_size=4, limit=4, cache=cache)
    assert first == _score("arc_easy", -1.0) and piqa.task == "piqa" and 0.0 <= piqa.value <= 1.0
    assert cache.load() == {"arc_easy": first, "piqa": piqa}
    # piqa killed after its last response was written: its score is not kept, its responses are
    kept = json.loads(cache.path.read_text())
    cache.path.write_text(json.dumps({**kept, "scores": {"arc_easy": kept["scores"]["arc_easy"]}}))

    def no_forward(*args, **kwargs):
        raise AssertionError("a cached request reached the model")

    hook = model.register_forward_pre_hook(no_forward)  # whichever scoring path runs, the model is not reached
    try:
        (again,) = evaluate_zeroshot(model, tok, ["piqa"], data_dir, batch_size=4, limit=4, cache=cache)
        other_model = ScoreCache(tmp_path, "key", "model-b")  # another fingerprint: nothing cached, the model runs
        with pytest.raises(AssertionError, match="reached the model"):
            evaluate_zeroshot(model, tok, ["piqa"], data_dir, batch_size=4, limit=4, cache=other_model)
    finally:
        hook.remove()
    assert again.all_metrics == piqa.all_metrics


class _Tracker:
    def __init__(self):
        self.metrics, self.tags, self.series = {}, {}, {}

    def log_series(self, name, values):
        self.series[name] = list(values)

    def log_metrics(self, metrics):
        self.metrics.update(metrics)

    def set_tags(self, tags):
        self.tags.update(tags)


def test_killed_run_resumes_at_the_next_task_on_the_same_model(tmp_path, monkeypatch):
    """A run killed after its first task, started again: the first task comes from the cache when the rebuilt
    model gives the same per-window NLLs, and is evaluated again when it does not."""
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    spec = RunSpec(
        model=ModelSpec("tiny-llama"),
        method="rtn",
        method_params={},
        bits=BitSpec.parse("w4a16kv16"),
        calib=CalibSpec(),
        ppl=PerplexitySpec(),
        zeroshot=ZeroShotSpec(tasks=("piqa", "winogrande")),
    )
    evaluated = []

    def fake_evaluate(model, tokenizer, tasks, data_dir, batch_size, limit, cache, kill_after=None, **sample):
        done, scores = cache.load(), []
        for task in tasks:
            if task in done:
                scores.append(done[task])
                continue
            if kill_after is not None and len(evaluated) == kill_after:
                raise KeyboardInterrupt
            evaluated.append(task)
            scores.append(_score(task, 0.5 + 0.1 * len(evaluated)))
            cache.save(task, scores[-1])
        return scores

    monkeypatch.setattr(zs, "evaluate_zeroshot", lambda *a, **k: fake_evaluate(*a, **k, kill_after=1))
    with pytest.raises(KeyboardInterrupt):
        steps.zeroshot(spec, nn.Identity(), None, _Tracker(), (3.0, 2.5))
    assert evaluated == ["piqa"]

    monkeypatch.setattr(zs, "evaluate_zeroshot", fake_evaluate)
    tracker = _Tracker()
    steps.zeroshot(spec, nn.Identity(), None, tracker, (3.0, 2.5))
    assert evaluated == ["piqa", "winogrande"]
    assert tracker.metrics["zs.piqa.acc"] == pytest.approx(0.6) and tracker.metrics[
        "zs.winogrande.acc"
    ] == pytest.approx(0.7)
    assert tracker.metrics["zs.avg"] == pytest.approx(0.65)
    assert tracker.tags["zs.from_earlier_attempt"] == "piqa"
    assert tracker.tags["zs.scoring"] == "shared-prefix"  # no quantizer looks across tokens
    assert not (tmp_path / "zeroshot" / f"{spec.run_key}.json").exists()  # recorded: the cache is gone

    monkeypatch.setattr(zs, "evaluate_zeroshot", lambda *a, **k: fake_evaluate(*a, **k, kill_after=3))
    with pytest.raises(KeyboardInterrupt):
        # piqa again (cache cleared), killed before winogrande
        steps.zeroshot(spec, nn.Identity(), None, _Tracker(), (3.0, 2.5))
    assert evaluated == ["piqa", "winogrande", "piqa"]
    monkeypatch.setattr(zs, "evaluate_zeroshot", fake_evaluate)
    tracker = _Tracker()
    steps.zeroshot(spec, nn.Identity(), None, tracker, (3.0, 2.5000001))  # another model: nothing reused
    assert evaluated[3:] == ["piqa", "winogrande"] and "zs.from_earlier_attempt" not in tracker.tags


def test_a_seeded_sample_is_the_same_sorted_documents_for_every_run():
    drawn = zs.sampled_documents(1838, 1000, seed=0)
    assert drawn == zs.sampled_documents(1838, 1000, seed=0) and drawn == sorted(set(drawn))
    assert len(drawn) == 1000 and 0 <= drawn[0] and drawn[-1] < 1838
    assert drawn != zs.sampled_documents(1838, 1000, seed=1)
    assert zs.sampled_documents(1000, 1000, seed=0) is None  # not larger than the sample: the whole split


def test_a_sampled_task_keeps_each_documents_outcome(tiny, data_dir):
    """The scored documents are the seeded sample, and the accuracy is the mean of the per-document outcomes;
    they are logged as series for paired comparisons (zs_doc.<task>.id / .correct)."""
    model, tok = tiny
    (score,) = evaluate_zeroshot(model, tok, ["piqa"], data_dir, batch_size=4, sample=7, sample_seed=3)
    assert list(score.documents) == zs.sampled_documents(1838, 7, seed=3)
    assert set(score.correct) <= {0, 1} and sum(score.correct) / 7 == pytest.approx(score.value)
    (first,) = evaluate_zeroshot(model, tok, ["piqa"], data_dir, batch_size=4, limit=4)
    assert list(first.documents) == [0, 1, 2, 3]


def test_mcnemar_counts_only_the_documents_where_the_runs_differ():
    from harness.stats import mcnemar_p_value

    a = [1] * 8 + [0] * 40 + [1] * 50
    b = [0] * 8 + [0] * 40 + [1] * 50  # a right on 8 documents b got wrong, never the other way
    assert mcnemar_p_value(a, b) == pytest.approx(2 * 0.5**8)
    assert mcnemar_p_value(a, a) == 1.0
    assert mcnemar_p_value([1, 0, 0, 0], [0, 1, 1, 1]) == pytest.approx(10 / 16)  # 1 vs 3: P(X <= 1 or X >= 3)
    assert math.isnan(mcnemar_p_value(a, b[:-1]))


def test_a_sampled_run_records_its_documents_and_refuses_limit_with_sample(tmp_path, data_dir):
    """Through the runner and the store: the record keeps each task's documents and outcomes (not as metrics),
    its protocol names the sample; asking for both the first documents and a sample is refused at planning."""
    from hydra import compose, initialize_config_dir

    from harness.cli_sweep import CONF_DIR
    from harness.records import export_records
    from harness.runner import execute, spec_from_config
    from harness.spec import SpecError
    from harness.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [
        *("model=tiny-llama", "budget=smoke", "eval.ppl.seqlen=256", "method=rtn", "bits=w4a16kv16"),
        *(f"data_dir={data_dir}", "eval=zs1k", "eval.zeroshot.tasks=[piqa]", "eval.zeroshot.sample=5"),
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        both = compose("config", overrides=[*overrides, "eval.zeroshot.limit=5"])
    with pytest.raises(SpecError, match="both set"):
        spec_from_config(both)
    assert execute(spec_from_config(cfg), cfg, Tracker(uri)).status == "finished"
    (record,) = export_records(uri, "quantbench")
    assert record["protocol"]["zs_sample"] == "5" and record["protocol"]["zs_sample_seed"] == "0"
    kept = record["zs_documents"]["piqa"]
    assert kept["documents"] == zs.sampled_documents(1838, 5, seed=0) and len(kept["correct"]) == 5
    assert sum(kept["correct"]) / 5 == pytest.approx(record["metrics"]["zs.piqa.acc_norm"])
    assert not any(name.startswith("zs_doc.") for name in record["metrics"])
