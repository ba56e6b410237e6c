"""methods/core/cpu_gemm.py: fp32 CPU linears on oneDNN agree with PyTorch's to fp32 rounding, are used only
where no gradient is taken, and a bad `cpu_gemm` is a one-line error."""

from unittest import mock

import pytest
import torch

from methods.core import cpu_gemm
from methods.core.cpu_gemm import gram, onednn_linear, use_cpu_gemm


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("pointwise", [True, False])
def test_onednn_linear_equals_torch_linear_to_fp32_rounding(pointwise, monkeypatch):
    if not pointwise:  # a build without the dense-tensor op: oneDNN-layout copies
        monkeypatch.setattr(cpu_gemm, "_POINTWISE", None)
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 37, 96), torch.randn(80, 96), torch.randn(80)
    out = onednn_linear(x, weight, bias)
    assert out.shape == (2, 37, 80)
    assert _relative(out, torch.nn.functional.linear(x, weight, bias)) < 1e-5
    assert _relative(onednn_linear(x.transpose(0, 1), weight), x.transpose(0, 1) @ weight.T) < 1e-5


def test_the_mode_routes_inference_linears_and_leaves_autograd_and_other_dtypes_alone():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(3, 10, 64)
    calls = []

    def counting(*args):
        calls.append(args[0].shape)
        return onednn_linear(*args)

    with mock.patch.object(cpu_gemm, "onednn_linear", counting):
        with torch.no_grad(), use_cpu_gemm("onednn"):
            routed = layer(x)
        assert len(calls) == 1
        assert _relative(routed, layer(x).detach()) < 1e-5
        with use_cpu_gemm("onednn"):  # a gradient is taken: PyTorch's own linear, so backward works
            layer(x.requires_grad_()).sum().backward()
            layer.to(torch.bfloat16)(x.detach().bfloat16())
        with torch.no_grad(), use_cpu_gemm("mkl"):
            layer.float()(x)
    assert len(calls) == 1
    assert x.grad is not None and layer.weight.grad is not None


def test_a_graph_torch_compile_traces_keeps_the_compilers_own_linear():
    """auto-round compiles each block it tunes inside a run's `use_cpu_gemm("onednn")`: a traced weight handed to
    oneDNN's op failed in the compiler's CPU lowering (InductorError), so a compiled frozen linear must compile,
    run and agree with the eager one."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32).requires_grad_(False)
    x = torch.randn(4, 16, 64)
    compiled = torch.compile(layer)
    with use_cpu_gemm("onednn"):
        out = compiled(x)
    assert _relative(out, torch.nn.functional.linear(x, layer.weight, layer.bias)) < 1e-5


def test_a_frozen_weight_with_a_trainable_input_runs_both_directions_on_onednn():
    """SpinQuant's case: the network frozen, the gradient flows to the (rotated) input only — forward and
    d input = d out · W both on oneDNN, equal to PyTorch's to fp32 rounding; a trainable bias is left alone."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48).requires_grad_(False)
    x = torch.randn(3, 20, 64)
    upstream = torch.randn(3, 20, 48)
    calls = []

    def counting(*args):
        calls.append(args[0].shape)
        return onednn_linear(*args)

    reference = x.clone().requires_grad_()
    (layer(reference) * upstream).sum().backward()
    routed = x.clone().requires_grad_()
    with mock.patch.object(cpu_gemm, "onednn_linear", counting), use_cpu_gemm("onednn"):
        out = layer(routed)
        (out * upstream).sum().backward()
        assert len(calls) == 2  # forward, and the input gradient
        layer.bias.requires_grad_(True)
        layer(x.clone().requires_grad_()).sum().backward()
    assert len(calls) == 2 and layer.bias.grad is not None
    assert _relative(out.detach(), layer(x).detach()) < 1e-5
    assert _relative(routed.grad, reference.grad) < 1e-5


def test_a_checkpointed_loss_recomputes_on_the_library_of_its_forward(tiny):
    """The chunked cross-entropy checkpoints its lm_head chunks; the backward recomputes them outside the
    `use_cpu_gemm` block, so it must re-enter oneDNN (else checkpoint's saved-tensor check fails). A frozen
    network, gradient to the input embeddings (SpinQuant's case): equal to MKL's to fp32 rounding."""
    from methods.core.losses import LossSettings, cross_entropy

    tiny, _ = tiny
    tiny.requires_grad_(False)
    gain = torch.ones(tiny.config.hidden_size, requires_grad=True)  # the only trainable tensor, on the input side
    tiny.model.embed_tokens.register_forward_hook(lambda module, args, out: out * gain)
    ids = torch.randint(0, tiny.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    grads = {}
    for name in ("onednn", "mkl"):
        gain.grad = None
        with use_cpu_gemm(name):
            assert cpu_gemm.current_cpu_gemm() == name
            cross_entropy(tiny, ids, settings=LossSettings(chunk=16)).backward()
        grads[name] = gain.grad.clone()
    assert cpu_gemm.current_cpu_gemm() == "mkl"
    assert _relative(grads["onednn"], grads["mkl"]) < 1e-4


def test_gram_is_x_transpose_x_under_either_library():
    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(1))
    for name in ("onednn", "mkl"):
        with use_cpu_gemm(name):
            assert _relative(gram(x), x.T @ x) < 1e-5


def test_a_bad_library_name_is_a_one_line_error_naming_the_choices():
    from harness.runner import _cpu_gemm
    from harness.spec import SpecError

    with pytest.raises(ValueError, match="onednn, mkl"):
        use_cpu_gemm("openblas")
    with pytest.raises(SpecError, match="cpu_gemm must be one of onednn, mkl, got 'openblas'"):
        _cpu_gemm("openblas")
    assert _cpu_gemm("mkl") == "mkl"


def test_runs_default_to_onednn_and_the_library_is_not_in_the_run_key():
    from hydra import compose, initialize_config_dir

    from harness.cli_sweep import CONF_DIR
    from harness.runner import spec_from_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        default = spec_from_config(compose("config", overrides=["model=tiny-llama"]))
        mkl = spec_from_config(compose("config", overrides=["model=tiny-llama", "cpu_gemm=mkl"]))
    assert (default.cpu_gemm, mkl.cpu_gemm) == ("onednn", "mkl")
    assert default.run_key == mkl.run_key


def test_a_few_rows_stay_on_torch_where_onednn_reorders_more_than_it_multiplies():
    layer = torch.nn.Linear(32, 16)
    calls = []
    with mock.patch.object(cpu_gemm, "onednn_linear", lambda *args: calls.append(1) or onednn_linear(*args)):
        with torch.no_grad(), use_cpu_gemm("onednn"):
            layer(torch.randn(1, 1, 32))
            layer(torch.randn(1, cpu_gemm.MIN_ROWS - 1, 32))
            assert not calls
            layer(torch.randn(1, cpu_gemm.MIN_ROWS, 32))
    assert len(calls) == 1
