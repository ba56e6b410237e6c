"""Slow tests on the embedded SmolLM2-135M-Instruct (run with `pytest -m slow`)."""

import pytest
import torch

from harness import data, models
from harness.evaluate.perplexity import perplexity
from harness.spec import BitSpec, ModelSpec
from methods import rtn
from methods.base import QuantContext

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return models.load(ModelSpec("smollm2-135m"))


def test_embedded_model_shape(smol):
    model, tok = smol
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert next(model.parameters()).dtype == torch.float32


def test_wikitext_token_count_and_fp_perplexity(smol, data_dir):
    model, tok = smol
    ids = data.ppl_token_ids("wikitext2", tok, data_dir)
    assert ids.shape == (1, 304_986)  # the full test split with this tokenizer: 148 windows of 2048
    fp = perplexity(model, ids, 2048, max_windows=2, progress=False)
    assert 5 < fp.ppl < 40, fp.ppl
    ctx = QuantContext(seed=0, calibration=lambda: [])
    rtn.quantize(model, rtn.RTNConfig(), BitSpec.parse("w3g128a16kv16"), ctx)
    w3 = perplexity(model, ids, 2048, max_windows=2, progress=False)
    assert w3.ppl > fp.ppl * 1.02  # 3-bit RTN costs accuracy on a model stored on a 4-bit grid


def test_quarot_rotation_preserves_the_embedded_model(data_dir):
    from methods import quarot

    model, tok = models.load(ModelSpec("smollm2-135m"))
    ids = data.ppl_token_ids("wikitext2", tok, data_dir)[:, :4096]
    with torch.inference_mode():
        ref = model(ids[:, :512]).logits
    fp = perplexity(model, ids, 2048, progress=False)
    quarot.quantize(model, quarot.QuaRotConfig(), BitSpec.parse("w16a16kv16"), QuantContext(0, lambda: []))
    with torch.inference_mode():
        out = model(ids[:, :512]).logits
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4
    rotated = perplexity(model, ids, 2048, progress=False)
    assert abs(rotated.ppl / fp.ppl - 1) < 1e-4


def test_signround_model_evaluates_as_auto_round_evaluates_it(data_dir):
    """Issue 5 on the embedded model: auto-round (RTN mode, iters=0, to keep it cheap) quantizes w4g128;
    our evaluator on our wrapped model and auto-round's evaluator (lm-eval) on the model it returned agree
    to 1e-3 relative on the same two 2048-token windows, fp32."""
    import copy

    from harness.evaluate.autoround_check import compare
    from harness.spec import CalibSpec
    from methods import signround

    model, tok = models.load(ModelSpec("smollm2-135m"))
    bits, cfg = BitSpec.parse("w4g128a16kv16"), signround.SignRoundConfig(iters=0)
    windows = data.calibration_windows(CalibSpec("wikitext2-valid", 512, 4), tok, 0, data_dir)
    tuned = signround.tune(model, cfg, bits, windows, tok, seed=0)
    ours = signround.wrap_tuned(copy.deepcopy(tuned), cfg, bits)
    ids = data.ppl_token_ids("wikitext2", tok, data_dir)
    check = compare(ours, tuned, tok, ids, seqlen=2048, n_windows=2)
    print(check)
    assert check.windows == 2 and check.tokens == 2 * 2047
    assert check.rel_diff < 1e-3, check

    # iters=0 is RTN: auto-round's and our `rtn` (same bits, group, asymmetric) agree within 0.5% in PPL.
    rtn_model, _ = models.load(ModelSpec("smollm2-135m"))
    rtn.quantize(rtn_model, rtn.RTNConfig(), bits, QuantContext(0, lambda: []))
    ppl_auto_round = perplexity(ours, ids, 2048, max_windows=2, progress=False).ppl
    ppl_rtn = perplexity(rtn_model, ids, 2048, max_windows=2, progress=False).ppl
    print(f"auto-round iters=0 {ppl_auto_round:.4f}, our rtn {ppl_rtn:.4f}")
    assert abs(ppl_auto_round / ppl_rtn - 1) < 5e-3


def test_gemma3_270m_loads_with_its_shape_and_scores_a_window(data_dir):
    """The second family end to end: Gemma-3-270M from its wheels (first load dequantizes the GGUF and caches it)."""
    model, tok = models.load(ModelSpec("gemma3-270m"))
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (18, 640, 2048, 256)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 1, 262_144)
    assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
    ids = data.ppl_token_ids("wikitext2", tok, data_dir)
    assert ids.shape == (1, 292_283)  # 142 windows of 2048
    first = perplexity(model, ids, 2048, max_windows=1, progress=False)
    assert 5 < first.ppl < 60, first.ppl
