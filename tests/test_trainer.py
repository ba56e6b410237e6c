"""The shared QAT path on tiny models: chunked losses, ParetoQ's learnable-step quantizers, prepare/convert, and
the training loop (loss decreases, resume equals uninterrupted, frozen teacher, parameter groups)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from harness.models import byte_tokenizer, tiny_gemma3, tiny_llama
from methods.core import lsq
from methods.core.losses import LossSettings, cross_entropy, distillation, teacher_confidence
from methods.core.qat import TrainableQLinear, convert, prepare
from methods.core.qlinear import QLinear
from methods.core.quantizers import WeightQuantizer
from methods.core.trainer import ParamGroup, TrainSettings, batch_at, lr_factor, train

W = torch.tensor([[0.3, -0.9, 0.05, 2.0]])


def _ids(batch=2, tokens=40, seed=0):
    return torch.randint(0, 250, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _corpus(windows=8, tokens=32):
    ids = byte_tokenizer()("the quick brown fox jumps over the lazy dog. " * 40).input_ids
    return torch.tensor(ids[: windows * tokens]).reshape(windows, tokens)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_chunked_cross_entropy_equals_the_full_logits_loss(make):
    model, _ = make(seed=0)
    ids = _ids()
    ours = cross_entropy(model, ids, settings=LossSettings(chunk=7))
    ours.backward()
    ours_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    reference = model(ids, labels=ids).loss
    reference.backward()
    assert torch.allclose(ours, reference, rtol=1e-6)
    assert torch.allclose(ours_grad, model.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-7)


def test_distillation_kinds_match_the_full_logits_formulas():
    teacher, _ = tiny_llama(seed=0)
    student, _ = tiny_llama(seed=1)
    ids = _ids()
    with torch.no_grad():
        log_s, log_t = F.log_softmax(student(ids).logits, -1), F.log_softmax(teacher(ids).logits, -1)
    forward = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    reverse = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    settings = LossSettings(chunk=9)
    with torch.no_grad():
        assert torch.allclose(distillation(student, teacher, ids, "forward", settings=settings), forward, rtol=1e-5)
        assert torch.allclose(distillation(student, teacher, ids, "reverse", settings=settings), reverse, rtol=1e-5)
        cakld = distillation(student, teacher, ids, "cakld", gamma=0.3, settings=settings)
        assert torch.allclose(cakld, 0.3 * reverse + 0.7 * forward, rtol=1e-5)
        assert distillation(teacher, teacher, ids, "cakld", gamma=0.3).abs() < 1e-6
        # BitDistiller's code reduction: summed over positions, averaged over sequences
        code = distillation(student, teacher, ids, "forward", settings=LossSettings(reduction="sequence_sum"))
        assert torch.allclose(code, forward * ids.shape[1], rtol=1e-5)


def test_teacher_confidence_and_the_reference_codes_count():
    teacher, _ = tiny_llama(seed=0)
    batches = [_ids(seed=s) for s in range(3)]
    with torch.no_grad():
        means = [F.softmax(teacher(b).logits, -1).amax(-1).mean() for b in batches]
    confidence = teacher_confidence(teacher, batches, chunk=11)
    assert confidence.gamma == pytest.approx(float(sum(means) / 3), rel=1e-5)
    assert confidence.gamma_reference_code == pytest.approx(float(sum(means) / 2), rel=1e-5)  # n + 1 batches / n


@pytest.mark.parametrize(
    ("bits", "alpha", "expected"),
    [
        (4, 0.1, [0.3, -0.8, 0.0, 0.7]),  # LSQ: round(w/α) clamped to [−8, 7]
        (3, 0.2, [0.4, -0.8, 0.0, 0.6]),  # [−4, 3]
        (2, 1.0, [0.25, -0.75, 0.25, 0.75]),  # SEQ: α·{±¼, ±¾}
        (lsq.TERNARY, 1.0, [0.0, -2 / 3, 0.0, 2 / 3]),  # SEQ ternary: α·{−⅔, 0, ⅔}
        (1, 0.5, [0.5, -0.5, 0.5, 0.5]),  # α·sign(w)
    ],
)
def test_forward_is_the_authors_equation(bits, alpha, expected):
    quantizer = lsq.ParetoQWeightQuantizer(W, bits)
    quantizer.alpha.data.fill_(alpha)
    assert torch.allclose(quantizer(W), torch.tensor([expected]), atol=1e-6)
    assert torch.allclose(quantizer.freeze(W).dequantize(), quantizer(W), atol=1e-6)


@pytest.mark.parametrize("bits", [1, lsq.TERNARY, 2, 3, 4])
def test_step_gradient_is_the_lsq_formula(bits):
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    quantizer = lsq.ParetoQWeightQuantizer(weight, bits)
    quantizer.alpha.data.mul_(0.7)  # some weights beyond the clip range
    upstream = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    w = weight.clone().requires_grad_(True)
    (quantizer(w) * upstream).sum().backward()
    x = weight / quantizer.alpha.detach()
    if bits in (2, lsq.TERNARY):
        lo, hi = -lsq.CLIP, lsq.CLIP
        edge = {2: 0.75, lsq.TERNARY: 1.0}[bits]  # the authors' (n − shift)/n; ternary's outer level is ⅔
        step = torch.where(x < lo, -edge, torch.where(x > hi, edge, lsq.seq_levels(x, bits) - x))
    elif bits == 1:
        lo, hi, step = -1, 1, torch.where(weight >= 0, 1.0, -1.0)
    else:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        step = torch.where(x < lo, float(lo), torch.where(x > hi, float(hi), torch.round(x) - x))
    q_p = 1 if bits in (1, 2, lsq.TERNARY) else 2 ** (bits - 1) - 1
    expected = (upstream * step).sum(-1, keepdim=True) / (weight.numel() * q_p) ** 0.5
    assert torch.allclose(quantizer.alpha.grad, expected, atol=1e-6)
    assert torch.equal(w.grad, upstream * ((x >= lo) & (x <= hi)))  # straight through inside the range only


def test_four_bit_lsq_at_step_zero_is_symmetric_per_channel_rtn():
    weight = torch.randn(8, 24, generator=torch.Generator().manual_seed(0))
    rtn = WeightQuantizer(4, None, sym=True).quantize(weight).dequantize()
    assert torch.allclose(lsq.ParetoQWeightQuantizer(weight, 4)(weight), rtn, atol=1e-6)


def _prepared(bits=2, seed=0):
    model, _ = tiny_llama(seed=seed)
    prepare(model, lambda name, w: lsq.ParetoQWeightQuantizer(w, bits))
    return model


def _settings(**overrides):
    groups = (ParamGroup(r"weight_quantizer\.alpha", 1e-3), ParamGroup(r"layers\..*\.weight$", 2e-3))
    return TrainSettings(**{"steps": 6, "batch_size": 2, "groups": groups, "schedule": "cosine", **overrides})


def test_training_lowers_the_loss_and_convert_keeps_the_function():
    model = _prepared()
    groups = (ParamGroup(r"weight_quantizer\.alpha", 1e-3), ParamGroup(r"layers\..*\.weight$", 1e-2))
    settings = _settings(steps=12, warmup_steps=2, groups=groups)
    result = train(model, lambda m, b: cross_entropy(m, b), _corpus(), settings)
    assert sum(result.losses[-3:]) / 3 < 0.95 * result.losses[0]  # only the decoder linears and steps train
    assert result.tokens == 12 * 2 * 32
    ids = _corpus()[:2]
    with torch.no_grad():
        before = model(ids).logits
        convert(model)
        after = model(ids).logits
    assert all(not isinstance(m, TrainableQLinear) for m in model.modules())
    assert isinstance(model.model.layers[0].mlp.down_proj, QLinear)
    assert torch.allclose(before, after, atol=1e-5)


def test_groups_freeze_what_they_do_not_name():
    model = _prepared()
    embeddings = model.model.embed_tokens.weight.detach().clone()
    alphas = {n: p.detach().clone() for n, p in model.named_parameters() if "alpha" in n}
    groups = (ParamGroup(r"weight_quantizer\.alpha", 0.0), ParamGroup(r"layers\..*\.weight$", 1e-2))
    train(model, lambda m, b: cross_entropy(m, b), _corpus(), _settings(steps=2, groups=groups))
    assert torch.equal(model.model.embed_tokens.weight, embeddings)  # matched by no group: frozen
    assert all(torch.equal(p, alphas[n]) for n, p in model.named_parameters() if "alpha" in n)  # lr 0
    with pytest.raises(ValueError, match="unknown optimizer"):
        train(model, cross_entropy, _corpus(), _settings(groups=(ParamGroup(".*", 1e-3, optimizer="lion"),)))


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    settings = _settings(checkpoint_every=1)
    loss = lambda m, b: cross_entropy(m, b)  # noqa: E731
    whole = _prepared()
    reference = train(whole, loss, _corpus(), settings, checkpoint_path=tmp_path / "whole.pt")

    def kill_after_third_step(step, metrics):
        if step == 2:
            raise KeyboardInterrupt("killed")

    killed = _prepared()
    with pytest.raises(KeyboardInterrupt):
        train(killed, loss, _corpus(), settings, tmp_path / "run.pt", on_step=kill_after_third_step)
    resumed_model = _prepared()  # a fresh process: the model as loaded, the checkpoint on disk
    resumed = train(resumed_model, loss, _corpus(), settings, checkpoint_path=tmp_path / "run.pt")
    assert resumed.resumed_from == 2 and resumed.losses == reference.losses
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed_model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no partial file


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PLANTED').write_text('ran')",))


def test_a_planted_checkpoint_cannot_run_code(tmp_path, monkeypatch):
    """Checkpoints load with weights_only=True: a file holding a pickled callable is refused with one line, before
    anything it holds runs."""
    monkeypatch.chdir(tmp_path)
    planted = tmp_path / "run.pt"
    torch.save({"step": 1, "payload": _RunsCodeWhenUnpickled()}, planted)
    with pytest.raises(ValueError, match=r"holds more than tensors and plain values .*delete it") as err:
        train(_prepared(), lambda m, b: cross_entropy(m, b), _corpus(), _settings(), checkpoint_path=planted)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "PLANTED").exists()


def test_distillation_training_never_changes_the_teacher():
    teacher, _ = tiny_llama(seed=0)
    frozen = copy.deepcopy(teacher.state_dict())
    student = _prepared()
    train(student, lambda m, b: distillation(m, teacher, b, "cakld", gamma=0.6), _corpus(), _settings(steps=3))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())


def test_data_order_and_schedules_are_functions_of_the_step():
    windows = torch.arange(10).reshape(5, 2)
    picks = torch.cat([batch_at(windows, k, 2, seed=3) for k in range(5)])[:, 0] // 2  # two epochs of 5
    assert sorted(picks[:5].tolist()) == sorted(picks[5:].tolist()) == [0, 1, 2, 3, 4]  # each epoch: every window
    assert not torch.equal(picks[:5], picks[5:])  # reshuffled per epoch
    assert torch.equal(batch_at(windows, 3, 2, seed=3), windows[picks[6:8]])  # addressed by position alone
    settings = TrainSettings(steps=10, warmup_steps=2, schedule="cosine")
    assert [round(lr_factor(s, settings), 4) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    assert lr_factor(9, TrainSettings(steps=10, schedule="linear")) == pytest.approx(0.1)


def test_a_custom_optimizer_plugs_in_per_group():
    """SpinQuant's Cayley SGD will come in this way: a factory named by a group, passed to `train`."""
    model = _prepared()
    built = []

    def plain_sgd(groups):
        built.append([len(g["params"]) for g in groups])
        return torch.optim.SGD(groups)

    groups = (
        ParamGroup(r"weight_quantizer\.alpha", 1e-3, optimizer="cayley-stand-in"),
        ParamGroup(r"mlp\..*weight$", 1e-3),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, cross_entropy, _corpus(), _settings(steps=1, groups=groups), optimizers={"cayley-stand-in": plain_sgd})
    assert built == [[2 * 7]]  # one param group: every linear's step size (2 blocks x 7 linears)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("alpha" in n for n in changed) and any("mlp" in n for n in changed)
    assert not any("self_attn" in n and n.endswith(".weight") for n in changed)
