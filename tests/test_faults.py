"""Faults injected on tiny-llama: a model that diverges, a run that runs out of memory, writes that fail
half-way, a corrupted model cache. Each must end with a clear message and lose nothing already recorded."""

import errno

import pytest
import torch

from harness.cli_sweep import recorded_outcomes
from harness.evaluate.divergence import first_nonfinite_module
from harness.records import export_records
from harness.report import render_leaderboard
from harness.runner import execute
from harness.tracking import Tracker
from methods import METHODS, rtn
from methods.base import MethodEntry
from tests.compose import SMOKE, compose_run


def _poisoned_rtn(target: str):
    def quantize(model, config, bits, ctx):
        summary = rtn.quantize(model, config, bits, ctx)
        with torch.no_grad():
            model.get_submodule(target).weight.fill_(float("inf"))
        return summary

    return MethodEntry(rtn.RTNConfig, supports=rtn.supports, quantize=quantize)


def test_first_nonfinite_module_names_the_innermost_module(tiny):
    model, _ = tiny
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    assert first_nonfinite_module(model, ids) is None
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    assert first_nonfinite_module(model, ids) == "model.layers.1.mlp.down_proj"


def test_a_diverged_model_ends_diverged_with_its_first_layer(tmp_path, data_dir, monkeypatch):
    monkeypatch.setitem(METHODS, "rtn", _poisoned_rtn("model.layers.1.self_attn.o_proj"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec, cfg = compose_run([*SMOKE, "bits=w4a16kv16", f"data_dir={data_dir}"])
    outcome = execute(spec, cfg, Tracker(uri))
    assert outcome.status == "diverged"
    assert outcome.detail == "non-finite output first at model.layers.1.self_attn.o_proj (window 0)"
    (record,) = export_records(uri, "quantbench")
    assert record["status"] == "DIVERGED" and "wikitext2_ppl" not in record["metrics"]
    assert record["metrics"]["diverged_window"] == 0  # evaluation stopped at the first window
    assert recorded_outcomes([(spec, (uri, "quantbench"))], 0)[spec.run_key][1] == "diverged"
    board = render_leaderboard([record])
    assert "| DIVERGED: non-finite output first at model.layers.1.self_attn.o_proj (window 0) |" in board
    # a diverged run is a result: the same key is not redone
    assert execute(spec, cfg, Tracker(uri)).status == "done-before"


def test_out_of_memory_fails_that_run_and_the_next_goes_on(tmp_path, data_dir, monkeypatch):
    def out_of_memory(model, config, bits, ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setitem(
        METHODS, "gptq", MethodEntry(METHODS["gptq"].config_cls, supports=lambda r: None, quantize=out_of_memory)
    )
    failing, failing_cfg = compose_run([*SMOKE, "method=gptq", "bits=w4a16kv16", f"data_dir={data_dir}"])
    fine, fine_cfg = compose_run([*SMOKE, "bits=w4a16kv16", f"data_dir={data_dir}"])
    assert execute(failing, failing_cfg, Tracker(uri)).status == "failed"
    assert execute(fine, fine_cfg, Tracker(uri)).status == "finished"
    records = {r["method"]: r for r in export_records(uri, "quantbench")}
    assert records["gptq"]["status"] == "FAILED"
    assert records["gptq"]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert records["rtn"]["status"] == "FINISHED"
    # the sweep's summary says why (a launcher such as submitit keeps the job's own log in its folder)
    outcomes = recorded_outcomes([(failing, (uri, "quantbench")), (fine, (uri, "quantbench"))], 0)
    assert outcomes[failing.run_key][1:] == (
        "failed",
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB",
    )
    assert outcomes[fine.run_key][1:] == ("finished", "")


def test_a_write_that_fails_half_way_leaves_no_file_and_says_why(tmp_path):
    from methods.core.atomic import WriteFailed, atomic_write

    target = tmp_path / "records.jsonl"
    target.write_text("the old, complete contents\n")

    def half_then_disk_full(path):
        path.write_text("half a rec")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteFailed) as err:
        atomic_write(target, half_then_disk_full)
    message = str(err.value)
    assert "no space left" in message.lower() and str(target) in message and "\n" not in message
    assert target.read_text() == "the old, complete contents\n"  # never replaced by the half-written file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]  # no temporary left behind


def test_records_written_while_the_disk_is_full_keep_the_old_file(tmp_path, monkeypatch):
    from harness import records as records_module
    from methods.core.atomic import WriteFailed

    path = tmp_path / "runs.jsonl"
    records_module.write_records([{"run_key": "a"}], path)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("methods.core.atomic.os.replace", full)
    with pytest.raises(WriteFailed):
        records_module.write_records([{"run_key": "a"}, {"run_key": "b"}], path)
    assert records_module.read_records(path) == [{"run_key": "a"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.jsonl"]


def _tiny_cache_builds(monkeypatch, seconds: float = 0.0):
    """models._build_cache replaced by what it does, from tiny-llama instead of a GGUF, taking `seconds`;
    returns (the tiny model, the list of targets built so far)."""
    import time

    from harness import models
    from methods.core.atomic import atomic_directory

    model, tokenizer = models.tiny_llama(seed=0)
    builds = []

    def build(target, _gguf):
        builds.append(target)
        time.sleep(seconds)

        def write(tmp):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            models.write_checksums(tmp)

        atomic_directory(target, write)

    monkeypatch.setattr(models, "_build_cache", build)
    return model, builds


def test_a_truncated_model_cache_is_detected_and_rebuilt(tmp_path, monkeypatch, capsys):
    from harness import models

    model, builds = _tiny_cache_builds(monkeypatch)
    target = tmp_path / "tiny-cache"
    models._load_cached_gguf(target, lambda: tmp_path / "model.gguf", torch.float32)
    assert len(builds) == 1 and models.cache_problem(target) is None
    models._load_cached_gguf(target, lambda: tmp_path / "model.gguf", torch.float32)
    assert len(builds) == 1  # a sound cache is used as it is

    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut off half-way
    assert "model.safetensors does not match its sha256" in models.cache_problem(target)
    loaded, _ = models._load_cached_gguf(target, lambda: tmp_path / "model.gguf", torch.float32)
    assert len(builds) == 2 and models.cache_problem(target) is None
    assert (
        "model.safetensors does not match its sha256 (truncated or modified); rebuilding it" in capsys.readouterr().err
    )
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)

    (target / models.CHECKSUMS).unlink()  # a cache from before checksums existed
    models._load_cached_gguf(target, lambda: tmp_path / "model.gguf", torch.float32)
    assert len(builds) == 3 and "no sha256sums.json" in capsys.readouterr().err


def test_two_loaders_of_an_empty_model_cache_build_it_once(tmp_path, monkeypatch):
    """Parallel workers (a joblib sweep, pytest -n) that find no cache: one builds it while the other waits,
    then both load the same files (without the lock each built a copy and swapped it in under the other)."""
    import threading

    from harness import models

    model, builds = _tiny_cache_builds(monkeypatch, seconds=0.5)  # the other loader arrives while it builds
    target = tmp_path / "tiny-cache"
    loaded, errors = [], []

    def load():
        try:
            loaded.append(models._load_cached_gguf(target, lambda: tmp_path / "model.gguf", torch.float32)[0])
        except Exception as err:  # noqa: BLE001 - reported by the assert below
            errors.append(err)

    workers = [threading.Thread(target=load) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == [] and len(builds) == 1 and len(loaded) == 2
    assert all(torch.equal(m.lm_head.weight, model.lm_head.weight) for m in loaded)
