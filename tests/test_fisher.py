"""Diagonal weight Fisher (methods/core/fisher.py)."""

from __future__ import annotations

import torch

from harness.models import tiny_llama
from methods.core.fisher import weight_fisher


def test_it_is_the_mean_squared_window_gradient_and_leaves_the_model_as_it_was():
    model, _ = tiny_llama(seed=0)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, model.config.vocab_size, (32,), generator=g) for _ in range(3)]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    fisher = weight_fisher(model, windows, names)
    expected = {name: torch.zeros_like(model.get_submodule(name).weight) for name in names}
    for window in windows:
        model.zero_grad()
        model(window.reshape(1, -1), labels=window.reshape(1, -1)).loss.backward()
        for name in names:
            expected[name] += model.get_submodule(name).weight.grad ** 2 / 3
    for name in names:
        assert torch.allclose(fisher[name], expected[name], rtol=1e-5, atol=1e-12)
        assert fisher[name].shape == model.get_submodule(name).weight.shape and fisher[name].sum() > 0
    model.zero_grad()
    assert all(p.requires_grad for p in model.parameters())  # flags restored
