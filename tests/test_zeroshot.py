"""Zero-shot through lm-eval: the mirror's tasks build the same requests as the registered tasks."""

import ast
from pathlib import Path

import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks.hellaswag.utils import preprocess
from lm_eval.utils import apply_template

from harness.evaluate.zeroshot import TaskUnavailable, evaluate_zeroshot, mirror_config, registered_config


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
