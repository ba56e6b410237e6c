import pytest

from harness.spec import BITS_GRAMMAR, BitSpec, CalibSpec, ModelSpec, PerplexitySpec, RunSpec, SpecError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("w2a4kv4", BitSpec(2, 4, 4, None)),
        ("w4g128a16kv16", BitSpec(4, 16, 16, 128)),
        ("w1.58a16kv16", BitSpec(1.58, 16, 16, None)),
        ("W16A16KV16", BitSpec(16, 16, 16, None)),
    ],
)
def test_parse_valid(text, expected):
    spec = BitSpec.parse(text)
    assert spec == expected
    assert BitSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["w2a4", "w0a4kv4", "wxa4kv4", "w4g0a16kv16", "w16g128a16kv16", "w4a1kv4", "w7a4kv4"])
def test_parse_malformed_shows_grammar(text):
    with pytest.raises(SpecError) as err:
        BitSpec.parse(text)
    message = str(err.value)
    assert BITS_GRAMMAR in message and "\n" not in message


def _spec(**changes):
    base = dict(
        model=ModelSpec("tiny-llama"),
        method="rtn",
        method_params={"w_sym": False},
        bits=BitSpec.parse("w4a16kv16"),
        calib=CalibSpec(),
        ppl=PerplexitySpec(),
    )
    base.update(changes)
    return RunSpec(**base)


def test_run_key_tracks_what_changes_numbers():
    assert _spec().run_key == _spec().run_key
    assert _spec().run_key == _spec(data_dir="/elsewhere").run_key
    assert _spec().run_key != _spec(bits=BitSpec.parse("w3a16kv16")).run_key
    assert _spec().run_key != _spec(method_params={"w_sym": True}).run_key
    assert _spec().run_key != _spec(seed=1).run_key
    assert _spec().run_key != _spec(ppl=PerplexitySpec(max_windows=2)).run_key


def test_a_later_parameter_inert_without_its_flag_keeps_old_keys():
    def key(**params):
        return _spec(method="bcq", method_params=params).run_key

    # bcq's uniform_grid (added later, legacy "midrise") only matters with uniform=True
    assert key(uniform=False) == key(uniform=False, uniform_grid="int4") == key(uniform=False, uniform_grid="midrise")
    assert key(uniform=True) == key(uniform=True, uniform_grid="midrise") != key(uniform=True, uniform_grid="int4")


def test_quantizers_compile_only_where_the_evaluation_pays_it_back():
    import pytest

    from harness.runner import _compile_quantizers
    from harness.spec import SpecError

    assert _compile_quantizers("auto", None) and _compile_quantizers("auto", 16)
    assert not _compile_quantizers("auto", 2)
    assert _compile_quantizers(True, 2) and not _compile_quantizers(False, None)
    with pytest.raises(SpecError, match="true, false or auto"):
        _compile_quantizers("sometimes", None)


@pytest.mark.parametrize(
    ("preset", "method", "bits", "kv", "budget"),
    [
        ("quarot-llama2-7b", "quarot", "w4a4kv4", "rtn", "full"),
        ("gptq-llama2-7b", "gptq", "w4g128a16kv16", "rtn", "full"),
        ("kvquant-llama-7b", "rtn", "w16a16kv3", "kvquant", "fullppl"),
    ],
)
def test_reproduce_presets_compose_the_papers_setting(preset, method, bits, kv, budget):
    """`+reproduce=<paper>-<model>` (conf/reproduce/): the paper's method, bits, plug-ins and budget on a hub model id
    we cannot fetch here (composition only)."""
    from hydra import compose, initialize_config_dir

    from harness.cli_sweep import CONF_DIR
    from harness.runner import spec_from_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"+reproduce={preset}", "model.id=org/some-7b"])
    spec = spec_from_config(cfg)
    assert (spec.method, str(spec.bits), spec.kv.name, spec.budget) == (method, bits, kv, budget)
    assert (spec.model.name, spec.model.id, spec.model.device, spec.ppl.dtype) == (
        "hf",
        "org/some-7b",
        "cuda",
        "float16",
    )
    assert spec.ppl.max_windows is None and spec.ppl.seqlen == 2048


def test_dataset_inputs_name_what_the_run_read():
    from hydra import compose, initialize_config_dir

    from harness.cli_sweep import CONF_DIR
    from harness.runner import run_datasets, spec_from_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        gptq = spec_from_config(compose("config", overrides=["method=gptq", "bits=w4g128a16kv16", "budget=fullppl"]))
        paretoq = spec_from_config(compose("config", overrides=["method=paretoq", "bits=w2a16kv16", "seed=3"]))
    names = {context: name for name, _, _, context in run_datasets(gptq, read_calibration=True)}
    assert names == {
        "evaluation": "wikitext2-test (whole x 2048)",
        "calibration": "wikitext2-valid (16 x 2048, seed 0)",
    }
    assert [c for *_, c in run_datasets(gptq, read_calibration=False)] == ["evaluation"]
    training = {context: name for name, _, _, context in run_datasets(paretoq, read_calibration=False)}
    assert training["training"].endswith("seed 3)")
    digests = {d for _, d, _, _ in run_datasets(gptq, True)}
    assert len(digests) == 2  # evaluation and calibration data are told apart


@pytest.mark.parametrize("typed", ["false", "False", "true", "'false'"])
def test_a_text_choice_typed_as_a_boolean_runs_under_its_choice_spelling(typed):
    """Hydra reads `method.duo_scaling=false` as a boolean; the str field then holds "False". The run must still
    plan, under the choice's own spelling, so a recorded "false" rebuilds the same run key (the CI failure of
    stop 54: the AWQ record's duo_scaling="true" came back as "True" and was refused)."""
    from hydra import compose, initialize_config_dir

    from harness.cli_sweep import CONF_DIR
    from harness.runner import spec_from_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        typed_spec = spec_from_config(compose("config", overrides=["method=awq", f"method.duo_scaling={typed}"]))
        both = spec_from_config(compose("config", overrides=["method=awq", "method.duo_scaling=both"]))
    spelled = typed.strip("'").lower()
    assert typed_spec.method_params["duo_scaling"] == spelled
    assert both.method_params["duo_scaling"] == "both"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        quoted = spec_from_config(compose("config", overrides=["method=awq", f"method.duo_scaling='{spelled}'"]))
    assert quoted.run_key == typed_spec.run_key != both.run_key
