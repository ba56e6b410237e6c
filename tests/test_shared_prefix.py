"""Shared-prefix scoring (harness/evaluate/shared_prefix.py): rows, masks and positions by hand; every request's
log-likelihood and greedy flag equal to lm-eval's default path on real task requests."""

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from harness.bench_zeroshot import compare_scoring, max_abs_difference
from harness.evaluate.shared_prefix import SharedPrefixLM, build_batch, pack_requests, scorer_for, token_local
from harness.evaluate.zeroshot import DEFAULT_TASKS
from methods.act.rtn import RTNActConfig
from methods.act.rtn import build as build_act
from methods.kv.akvq import AKVQConfig
from methods.kv.akvq import build as build_akvq
from methods.kv.rtn import RTNKVConfig
from methods.kv.rtn import build as build_kv


def _request(context, continuation):
    return ((f"{context}", f"{continuation}"), list(context), list(continuation))


def test_requests_of_one_context_share_a_row_and_a_repeated_pair_one_slot():
    requests = [
        _request((1, 2, 3), (4, 5)),
        _request((7, 8), (9,)),
        _request((1, 2, 3), (6,)),
        _request((1, 2, 3), (4, 5)),
    ]
    rows, fallback = pack_requests(requests, max_tokens=16)
    assert fallback == []
    assert [row.context for row in rows] == [(1, 2, 3), (7, 8)]  # longest row first
    assert rows[0].continuations == [(4, 5), (6,)] and rows[0].requests == [[0, 3], [2]]
    assert len(rows[0]) == 3 + 1 + 0  # the context, then each continuation but its last token


def test_a_context_whose_continuations_overflow_a_row_is_split_and_an_overlong_request_falls_back():
    requests = [_request((1, 2, 3), (4, 5, 6)), _request((1, 2, 3), (7, 8, 9)), _request((1,) * 9, (2, 3))]
    rows, fallback = pack_requests(requests, max_tokens=6)
    assert fallback == [2]  # 9 + 2 - 1 = 10 tokens > 6: lm-eval truncates it, so lm-eval scores it
    assert [row.continuations for row in rows] == [[(4, 5, 6)], [(7, 8, 9)]]


def test_block_mask_positions_and_targets_by_hand():
    rows, _ = pack_requests([_request((1, 2, 3), (4, 5)), _request((1, 2, 3), (6, 7, 8)), _request((9,), (5,))], 16)
    batch = build_batch(rows, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 6, 7], [9, 0, 0, 0, 0, 0]]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 3, 4]  # each continuation restarts after the context
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],  # continuation 1 sees the context and itself
            [1, 1, 1, 0, 1, 0],  # continuation 2 does not see continuation 1
            [1, 1, 1, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(batch.allowed[0, 0], expected)
    assert torch.equal(batch.allowed[1, 0], torch.eye(6, dtype=torch.bool))  # padding attends to itself only
    assert batch.targets[0] == [([2, 3], (4, 5)), ([2, 4, 5], (6, 7, 8))]
    assert batch.targets[1] == [([0], (5,))]


@pytest.fixture()
def tiny64(tiny):
    model, tokenizer = tiny
    return model.to(torch.float64), tokenizer


def test_every_task_scores_equal_to_lm_eval_on_its_first_200_documents(tiny64, data_dir):
    """float64, so float rounding (~1e-5 in float32 for either path between batch sizes) is far below the bound."""
    model, tokenizer = tiny64
    for task in DEFAULT_TASKS:
        default, shared = compare_scoring(model, tokenizer, task, data_dir, limit=200, batch_size=8)
        worst, flips = max_abs_difference(default, shared)
        assert worst <= 1e-5 and flips == 0, (task, worst, flips)
        assert shared.value == default.value
        if task != "lambada_openai":  # one continuation per document: nothing to share
            assert shared.forward_tokens < default.forward_tokens, task


def test_per_token_act_and_kv_quantizers_keep_the_equality(tiny64, data_dir):
    model, tokenizer = tiny64
    build_act(RTNActConfig(), 4).attach(model)
    build_kv(RTNKVConfig(group_size=8), 4).attach(model)
    assert token_local(model) and scorer_for(model) == (SharedPrefixLM, "shared-prefix")
    default, shared = compare_scoring(model, tokenizer, "arc_easy", data_dir, limit=50, batch_size=8)
    worst, flips = max_abs_difference(default, shared)
    assert worst <= 1e-5 and flips == 0


def test_a_quantizer_that_looks_across_tokens_is_scored_by_lm_eval(tiny):
    model, _ = tiny
    assert scorer_for(model) == (SharedPrefixLM, "shared-prefix")
    build_akvq(AKVQConfig(), 2).attach(model)  # pivot tokens chosen from the whole attention map
    assert not token_local(model) and scorer_for(model) == (HFLM, "lm-eval")


@pytest.mark.slow
def test_smollm2_hellaswag_same_accuracy_and_float64_equality(data_dir):
    from harness import models
    from harness.spec import ModelSpec

    model, tokenizer = models.load(ModelSpec("smollm2-135m"))
    default, shared = compare_scoring(model, tokenizer, "hellaswag", data_dir, limit=100)
    assert shared.value == default.value and max_abs_difference(default, shared)[1] == 0
    assert default.forward_tokens >= 1.8 * shared.forward_tokens
    default, shared = compare_scoring(model.to(torch.float64), tokenizer, "hellaswag", data_dir, limit=25)
    assert max_abs_difference(default, shared)[0] <= 1e-5


def test_rows_longer_than_a_sliding_window_are_left_to_lm_eval(data_dir):
    """Gemma 3 attends locally in most layers; the block mask would replace that window, so a row may not exceed
    it (tiny-gemma3's window is 16 tokens: every request goes to lm-eval's path)."""
    from harness.models import tiny_gemma3

    model, tokenizer = tiny_gemma3(seed=0)
    default, shared = compare_scoring(model.to(torch.float64), tokenizer, "arc_easy", data_dir, limit=20)
    assert shared.forward_tokens == 0 and max_abs_difference(default, shared) == (0.0, 0)
