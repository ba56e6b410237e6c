"""LO-BCQ (methods/bcq.py, methods/act/bcq.py, methods/core/bcq.py)."""

from __future__ import annotations

import pytest
import torch

from methods.act.bcq import BCQActConfig, _SharedInputEncoder
from methods.act.bcq import build as build_act
from methods.bcq import UNIFORM_ENTRIES, UNIFORM_GRIDS, BCQConfig, encode_weight
from methods.core import bcq


def _weights(rows=32, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.linspace(0.05, 1.0, cols)
    w[:, 5] *= 6
    return w


def _blocks(n=4000, seed=0):
    layout = bcq.BCQLayout()
    return bcq.normalize(_weights(n * 8 // 128, 128, seed), layout)[0].reshape(-1, 8)


def test_lo_bcq_mse_never_increases():
    _, history = bcq.lo_bcq(_blocks(), n_codebooks=8, iterations=12, lloyd_iterations=2)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:], strict=False)), history
    assert history[-1] < 0.95 * history[0]  # and it does improve on its start


def test_more_codebooks_fit_better():
    blocks = _blocks()
    one = bcq.lo_bcq(blocks, 1, 8)[1][-1]
    sixteen = bcq.lo_bcq(blocks, 16, 8)[1][-1]
    assert sixteen < one


def test_each_block_takes_its_least_error_codebook():
    codebooks = bcq.integer_entries(bcq.initial_codebooks(_blocks(), 4), bcq.BCQLayout())
    blocks = _blocks(200, seed=3)
    selectors, indices, errors = bcq.encode_blocks(blocks, codebooks)
    brute = torch.stack(
        [((blocks[:, :, None] - book[None, None]) ** 2).min(dim=-1).values.sum(-1) for book in codebooks], dim=-1
    )
    assert torch.allclose(errors, brute.min(dim=-1).values)
    assert torch.allclose(brute.gather(1, selectors[:, None])[:, 0], errors)
    decoded = bcq.decode_blocks(selectors, indices, codebooks)
    assert torch.allclose(((blocks - decoded) ** 2).sum(-1), errors, atol=1e-4)
    assert torch.equal(bcq.quantize_blocks(blocks, codebooks), decoded)


def test_encode_decode_round_trips_codebook_values_exactly():
    codebooks = torch.stack([torch.arange(-15, 17, 2.0), torch.arange(-8, 8, 1.0) * 3]).sort(dim=-1).values
    g = torch.Generator().manual_seed(0)
    choice = torch.randint(0, 2, (300,), generator=g)
    picks = torch.randint(0, 16, (300, 8), generator=g)
    blocks = codebooks[choice[:, None].expand(-1, 8), picks]
    selectors, indices, errors = bcq.encode_blocks(blocks, codebooks)
    assert torch.equal(bcq.decode_blocks(selectors, indices, codebooks), blocks) and float(errors.max()) == 0


def test_bcq_weight_is_the_fake_quantizer_and_counts_its_packed_bytes():
    layout = bcq.BCQLayout(array_len=64, n_codebooks=16)
    w = _weights(24, 128)
    codebooks = bcq.integer_entries(bcq.lo_bcq(bcq.normalize(w, layout)[0].reshape(-1, 8), 16, 5)[0], layout)
    qweight = encode_weight(w, codebooks, layout)
    assert torch.allclose(qweight.dequantize(), bcq.fake_quantize(w, codebooks, layout), atol=1e-6)
    assert qweight.storage_bits() == 8 * qweight.pack().nbytes()
    per_weight = qweight.storage_bits() / w.numel()
    overhead = (24 * 32 + codebooks.numel() * 8) / w.numel()  # row scales + int8 codebooks
    assert per_weight == pytest.approx(layout.effective_bits() + overhead) and layout.effective_bits() == 4.625
    assert float(((qweight.dequantize() - w) ** 2).mean() / (w**2).mean()) < 0.02


def test_widths_that_l_a_does_not_divide_are_zero_padded():
    layout = bcq.BCQLayout(array_len=128)
    w = _weights(8, 192)  # 1.5 block arrays
    qweight = encode_weight(w, UNIFORM_ENTRIES.reshape(1, -1), bcq.BCQLayout(array_len=128, n_codebooks=1))
    assert qweight.indices.shape == (8, 256) and qweight.dequantize().shape == w.shape
    assert torch.allclose(qweight.dequantize(), bcq.fake_quantize(w, UNIFORM_ENTRIES.reshape(1, -1), layout))
    assert qweight.storage_bits() == 8 * qweight.pack().nbytes()


def test_single_codebook_stores_no_selectors_and_uniform_is_int4():
    layout = bcq.BCQLayout(n_codebooks=1)
    qweight = encode_weight(_weights(8, 64), UNIFORM_ENTRIES.reshape(1, -1), layout)
    assert qweight.selector_bits == 0 and qweight.pack().selector_words is None
    assert qweight.storage_bits() == 8 * qweight.pack().nbytes()
    assert torch.equal(UNIFORM_ENTRIES.diff(), torch.full((15,), 4.0)) and UNIFORM_ENTRIES.numel() == 16
    assert 0.0 in UNIFORM_ENTRIES.tolist() and UNIFORM_ENTRIES.min() == -32 and UNIFORM_ENTRIES.max() == 28
    assert 0.0 not in UNIFORM_GRIDS["midrise"].tolist() and UNIFORM_GRIDS["midrise"].numel() == 16
    assert BCQConfig(uniform=True).layout().n_codebooks == 1


def test_uniform_grid_choice_reaches_the_codebooks_and_a_bad_one_is_a_one_line_error():
    from methods.bcq import design_codebooks
    from methods.core.bits import BitSpec

    spec = BitSpec.parse("w4a16kv16")
    for grid in ("int4", "midrise"):
        books, _ = design_codebooks(None, BCQConfig(uniform=True, uniform_grid=grid), spec, None, None)
        assert torch.equal(books[0], UNIFORM_GRIDS[grid])
    with pytest.raises(ValueError, match="uniform_grid must be one of int4, midrise"):
        design_codebooks(None, BCQConfig(uniform=True, uniform_grid="nf4"), spec, None, None)


def test_e4m3_array_scales_and_row_scales_keep_values_in_codebook_range():
    layout = bcq.BCQLayout()
    x = _weights(16, 128) * 1e-4  # small weights: the row scale brings them into E4M3's range
    blocks, row_scale, array_scale = bcq.normalize(x, layout)
    assert torch.equal(array_scale, bcq.e4m3(array_scale)) and bool((array_scale > 0).all())
    assert float(blocks.abs().max()) <= layout.entry_max * 1.07  # E4M3 rounding: within 2^-4 relative


def test_shared_input_is_encoded_once():
    codebooks = UNIFORM_ENTRIES.reshape(1, -1)
    encoder = _SharedInputEncoder(codebooks, bcq.BCQLayout(n_codebooks=1))
    x = _weights(4, 64)
    first = encoder(x)
    assert encoder(x) is first  # q/k/v read the same tensor
    x.mul_(2)  # modified in place: encoded again
    assert not torch.equal(encoder(x), first)


def test_bad_settings_fail_with_the_fix():
    with pytest.raises(ValueError, match="array_len 60 must be a multiple of block_len 8"):
        bcq.BCQLayout(array_len=60).check()
    with pytest.raises(ValueError, match="use a4"):
        build_act(BCQActConfig(), 8)


def test_act_plugin_under_bcq_takes_the_methods_codebooks(data_dir, tmp_path):
    from hydra import compose, initialize_config_dir

    from harness import models
    from harness.cli_sweep import CONF_DIR
    from harness.runner import apply, make_context, spec_from_config
    from methods import METHODS

    overrides = ["method=bcq", "act=bcq", "model=tiny-llama", "bits=w4a4kv16", "budget=smoke", "calib.seqlen=64"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        spec = spec_from_config(compose("config", overrides=overrides + ["method.calib_blocks=4000"]))
    model, tokenizer = models.load(spec.model)
    from dataclasses import replace

    ctx = make_context(replace(spec, data_dir=data_dir), tokenizer)
    entry = METHODS["bcq"]
    summary = apply(model, entry, entry.make_config("bcq", spec.method_params), spec.bits, ctx)
    assert not ctx.act.needs_calibration and torch.equal(
        ctx.act.codebooks, model.model.layers[0].mlp.down_proj.qweight.codebooks
    )
    assert summary.metrics["bcq_mse_last"] <= summary.metrics["bcq_mse_first"]
    assert summary.metrics["bcq_effective_bits"] == 4.625
    import json

    artifact = json.loads(summary.artifacts["bcq_codebooks.json"])  # logged with the run
    assert torch.equal(torch.tensor(artifact["codebooks"], dtype=torch.float32), ctx.act.codebooks)
    assert artifact["layout"]["n_codebooks"] == 16


def test_the_compiled_activation_encoder_gives_the_eager_values():
    from methods.core.quantizers import compile_quantizers

    layout = bcq.BCQLayout()
    codebooks = bcq.integer_entries(bcq.initial_codebooks(_blocks(), 16), layout)
    x = _weights(64, 192, seed=4) * 3
    eager = bcq.fake_quantize(x, codebooks, layout)
    try:
        compile_quantizers(True)
        assert torch.equal(bcq.fake_quantize(x, codebooks, layout), eager)
    finally:
        compile_quantizers(False)


def test_sampled_blocks_are_those_of_normalising_everything():
    """Normalising only the drawn rows gives the blocks a draw from the fully normalised input gives."""
    layout = bcq.BCQLayout(block_len=8, array_len=64, n_codebooks=4)
    x = torch.randn(300, 576, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 5, 300)[:, None]
    everything = bcq.normalize(x, layout)[0].reshape(-1, 8)
    expected = everything[torch.randperm(everything.shape[0], generator=torch.Generator().manual_seed(3))[:500]]
    drawn = bcq.sample_blocks(x, layout, 500, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, expected)
    assert torch.equal(bcq.sample_blocks(x[:2], layout, 10**6, torch.Generator()), everything[:144])
