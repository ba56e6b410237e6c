"""Planning a run or sweep from the command line: bad input and unsupported pairs are refused, each with one
line naming the fix, before any model loads (no subprocess: `cli_sweep.plan` and `cli_sweep.main` in-process)."""

import pytest

from harness import cli_sweep
from harness.spec import BITS_GRAMMAR, SpecError


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["method=nope"],
            "unknown method 'nope'; valid: awq, bcq, bitdistiller, gptq, gptq_llmc, hqq, omniquant, paretoq, quarot, "
            "quip, quipsharp, r2q, rcp, rsavq, rtn",
        ),
        (["model=gpt9"], "unknown model 'gpt9'; valid: gemma3-270m, hf, smollm2-135m, tiny-gemma3, tiny-llama"),
        (["bits=w2a4"], BITS_GRAMMAR),
        (["bits=w4a16kv16,w0a4kv4"], BITS_GRAMMAR),
        (["method.w_symm=true"], "Could not override 'method.w_symm'"),
        (["method=rtn", "+method.w_symm=true"], "has no parameter(s) w_symm"),
        (["kv=nosuch"], "unknown kv 'nosuch'; valid: akvq, kvquant, rtn"),
        (["act=nosuch", "bits=w4a4kv4"], "unknown act 'nosuch'; valid: bcq, rtn"),
        (["kv.clip=0.9"], "Could not override 'kv.clip'"),
        (["method.damp=abc", "method=gptq"], "Value 'abc' of type 'str' could not be converted to Float"),
        (["seed=abc"], "seed must be an integer, got 'abc' (e.g. seed=0; a sweep: seed=0,1,2)"),
        (["seed=1.5"], "seed must be an integer, got 1.5"),
        (["eval.ppl.dataset=ptb"], "unknown perplexity dataset 'ptb'; valid: wikitext2"),
        (["model=hf"], "model=hf needs model.id=<hub id or local path>"),
    ],
)
def test_bad_input_fails_before_anything_runs(overrides, expected):
    with pytest.raises(SpecError) as err:
        cli_sweep.plan(["model=tiny-llama", *overrides])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_an_unknown_zero_shot_task_fails_at_planning(data_dir):
    with pytest.raises(SpecError) as err:
        cli_sweep.plan(
            ["model=tiny-llama", "eval=fast", "eval.zeroshot.tasks=[piqa,nosuchtask]", f"data_dir={data_dir}"]
        )
    assert str(err.value).startswith("unknown zero-shot task 'nosuchtask': the data mirror has piqa, hellaswag")


def test_every_malformed_combination_of_a_large_sweep_is_listed_at_once():
    bits = "bits=w4a16kv16,w3a16kv16,w0a4kv4,w2a16kv16,w4g128a16kv16"
    with pytest.raises(SpecError) as err:
        cli_sweep.plan(["model=tiny-llama", bits, "seed=0,1,2,abc", "method=rtn,gptq,quarot,signround,paretoq"])
    lines = str(err.value).splitlines()
    assert lines[0] == "55 of 100 combinations are malformed (nothing was run):"
    bits_line, group_line, seed_line, both_line = sorted(lines[1:])
    assert bits_line.startswith("  bits 'w0a4kv4': weight bits 0 not allowed") and "and 14 more]" in bits_line
    # tiny-llama's narrowest linear is 64 wide: g128 is refused, with the seed's problem where both are wrong
    assert group_line.startswith("  invalid configuration: bits=w4g128a16kv16: group 128 (must be <= 64")
    assert (
        both_line.startswith("  invalid configuration: seed must be an integer, got 'abc'") and "group 128" in both_line
    )
    assert (
        seed_line.startswith("  invalid configuration: seed must be an integer, got 'abc'")
        and "and 19 more]" in seed_line
    )


def test_a_composition_the_method_refuses_is_listed_with_the_fix():
    runnable, unsupported = cli_sweep.plan(
        ["model=tiny-llama", "method=quarot,gptq", "bits=w4a4kv4", "kv.keys_pre_rope=true"]
    )
    assert runnable == ["tiny-llama/gptq/w4a4kv4"]
    assert len(unsupported) == 1 and "set kv.keys_pre_rope=false" in unsupported[0]
    _, unsupported = cli_sweep.plan(["model=tiny-gemma3", "method=quarot", "bits=w4a16kv16"])
    assert "quarot does not support the gemma3 architecture" in unsupported[0]


def test_unsupported_pairs_are_listed_not_run():
    runnable, unsupported = cli_sweep.plan(["model=tiny-llama", "bits=w4a16kv16,w1.58a16kv16"])
    assert runnable == ["tiny-llama/rtn/w4a16kv16"]
    assert len(unsupported) == 1 and "w1.58a16kv16" in unsupported[0] and "2, 3, 4" in unsupported[0]


def test_run_refuses_an_unsupported_pair(capsys):
    assert cli_sweep.main(["model=tiny-llama", "bits=w1.58a16kv16"], multirun=False) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tiny-llama/rtn/w1.58a16kv16: rtn does not support") and "\n" not in err
