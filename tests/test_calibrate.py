"""Layer-by-layer replay: each block re-run on its captured inputs with its own kwargs reproduces the model."""

import pytest
import torch

from harness import models
from methods.core.arch import arch_of
from methods.core.calibrate import HessianCollector, capture_block_inputs, run_block, shared_input_owner, walk_blocks


def _windows(n, seqlen=40):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (1, seqlen), generator=gen) for _ in range(n)]


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gemma3"])
def test_block_replay_reproduces_every_hidden_state(family):
    model, _ = models.load(models.ModelSpec(family))
    windows = _windows(6)  # batches of 4 and 2: each batch replays its own mask
    with torch.no_grad():
        reference = [model.model(torch.cat(windows[:4]), output_hidden_states=True).hidden_states]
        reference.append(model.model(torch.cat(windows[4:]), output_hidden_states=True).hidden_states)
    seen = 0
    for index, _block, inputs in walk_blocks(model, windows, batch_size=4):
        for batch, hidden in enumerate(inputs.hidden):
            assert torch.allclose(hidden, reference[batch][index], atol=1e-5), (family, index, batch)
        seen += 1
    assert seen == model.config.num_hidden_layers


def test_gemma3_blocks_get_their_own_mask():
    model, _ = models.tiny_gemma3(seed=0)
    _, kwargs = capture_block_inputs(model, _windows(2, seqlen=40), batch_size=2)
    sliding, full = kwargs[0][0], kwargs[-1][0]
    assert model.config.layer_types[0] == "sliding_attention" and model.config.layer_types[-1] == "full_attention"
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])  # RoPE bases differ
    # Replaying the full-attention block with the sliding block's kwargs would change its output.
    inputs, _ = capture_block_inputs(model, _windows(2, seqlen=40), batch_size=2)
    last = model.model.layers[-1]
    own = run_block(last, type(inputs)(hidden=inputs.hidden, kwargs=[full]))
    wrong = run_block(last, type(inputs)(hidden=inputs.hidden, kwargs=[sliding]))
    assert not torch.allclose(own[0], wrong[0], atol=1e-4)


def test_shared_inputs_share_one_hessian(tiny):
    model, _ = tiny
    arch = arch_of(model)
    block = arch.layers(model)[0]
    linears = {name: getattr(parent, attr) for name, (parent, attr) in arch.block_linears(block).items()}
    collector = HessianCollector(linears, shared_input_owner(arch))
    inputs, kwargs = capture_block_inputs(model, _windows(2), batch_size=2)
    run_block(block, type(inputs)(hidden=inputs.hidden, kwargs=kwargs[0]))
    collector.remove()
    assert sorted(collector.hessians) == ["mlp.down_proj", "mlp.gate_proj", "self_attn.o_proj", "self_attn.q_proj"]
    assert collector.hessian("self_attn.v_proj") is not None and collector.tokens["self_attn.q_proj"] == 80


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gemma3"])
def test_collect_stops_each_forward_once_its_linears_have_their_inputs_with_the_same_hessians(family):
    model, _ = models.load(models.ModelSpec(family))
    arch = arch_of(model)
    block = arch.layers(model)[0]
    places = arch.block_linears(block)
    linears = {name: getattr(*places[name]) for name in places}
    inputs, kwargs = capture_block_inputs(model, _windows(3), batch_size=2)
    inputs = type(inputs)(hidden=inputs.hidden, kwargs=kwargs[0])
    full = HessianCollector(linears, shared_input_owner(arch))
    run_block(block, inputs)  # every linear runs: the reference Hessians
    full.remove()
    reached = []
    counters = [linears[name].register_forward_pre_hook(lambda m, a, n=name: reached.append(n)) for name in linears]
    qkv = {name: linears[name] for name in linears if name.startswith("self_attn.") and "o_proj" not in name}
    early = HessianCollector(qkv, shared_input_owner(arch))
    early.collect(block, inputs)  # q/k/v read the first norm's output: nothing after q_proj runs
    early.remove()
    assert reached == ["self_attn.q_proj"] * 2
    reached.clear()
    late = HessianCollector({"mlp.down_proj": linears["mlp.down_proj"]}, shared_input_owner(arch))
    late.collect(block, inputs)  # stops at down_proj's input: its matmul never runs
    late.remove()
    for handle in counters:
        handle.remove()
    assert reached.count("mlp.down_proj") == 2 and reached[-1] == "mlp.down_proj"
    torch.testing.assert_close(early.hessian("self_attn.k_proj"), full.hessian("self_attn.q_proj"), rtol=0, atol=0)
    torch.testing.assert_close(late.hessian("mlp.down_proj"), full.hessian("mlp.down_proj"), rtol=0, atol=0)
