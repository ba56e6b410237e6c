"""The extension-points refactor changed no number: RTN, GPTQ and QuaRot on tiny-llama, composed the new way
(Hydra config -> RunSpec -> method + act/KV plug-ins through `runner.apply`), give the logits recorded before
the refactor (commit 4630f29, where A/KV settings were method parameters), and the run keys of configurations
that existed before are unchanged (so resumed sweeps skip recorded runs).

The logits were bit-identical on the machine that recorded them (old and new code run side by side); the stored
slice is compared to 1e-4, because another CPU may sum in another order (the closest two methods differ by 0.04).
"""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from harness.cli_sweep import CONF_DIR
from harness.runner import apply, build_plugins, spec_from_config
from methods import METHODS
from methods.base import QuantContext
from methods.core.params import key_neutral, legacy_values

REFERENCE = json.loads((Path(__file__).parent / "data" / "prerefactor_logits.json").read_text())


def _windows():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (1, 64), generator=gen) for _ in range(8)]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return spec_from_config(compose("config", overrides=overrides))


@pytest.mark.parametrize("case", sorted(REFERENCE["logits"]))
def test_logits_identical_to_before_the_refactor(case, tiny):
    method, bits, params = case.split("/", 2)
    overrides = [f"method={method}", f"bits={bits}", "model=tiny-llama"]
    # Parameters added (or whose default changed) since then, at the value the recorded code had.
    params = {**legacy_values(METHODS[method].config_cls), **json.loads(params)}
    overrides += [f"method.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items()]
    spec = _compose(overrides)
    model, _ = tiny
    entry = METHODS[method]
    act, kv = build_plugins(spec)
    config = entry.make_config(method, spec.method_params)
    apply(model, entry, config, spec.bits, QuantContext(seed=0, calibration=_windows, act=act, kv=kv))
    with torch.no_grad():
        logits = model(torch.arange(240).reshape(2, 120) % 250).logits
    torch.testing.assert_close(logits[:, ::12, ::8], torch.tensor(REFERENCE["logits"][case]), atol=1e-4, rtol=0)


def _record_overrides(rec):
    p = rec["protocol"]
    overrides = [
        f"model={rec['model']}",
        f"method={rec['method']}",
        f"bits={rec['bits']}",
        f"budget={p['budget']}",
        f"calib.nsamples={p['calib_nsamples']}",
        f"calib.seqlen={p['calib_seqlen']}",
        f"calib.dataset={p['calib_dataset']}",
        f"eval.ppl.dtype={p['ppl_dtype']}",
        f"seed={p['seed']}",
    ]
    if p["zs_tasks"] not in ("[]", None):
        overrides += ["eval=fast" if p["zs_limit"] == "200" else "eval=full", f"eval.zeroshot.limit={p['zs_limit']}"]
    # A parameter added after the record was made: the record ran with its legacy value.
    added = {k: str(v) for k, v in key_neutral(METHODS[rec["method"]].config_cls).items()}
    for name, value in {**added, **rec["method_params"]}.items():
        if name.startswith(("a_", "kv_")):
            group, key = ("act", name[2:]) if name.startswith("a_") else ("kv", name[3:])
            overrides.append(f"{group}.{key}={value.lower() if value in ('True', 'False') else value}")
        else:
            overrides.append(f"method.{name}={value.lower() if value in ('True', 'False') else value}")
    return overrides


def test_recorded_runs_keep_their_run_keys():
    """Every record logged before the refactor, re-composed from its logged parameters, hashes to the key it was
    logged under, and that key is still on the leaderboard. The 44 such records are kept as they were logged
    (tests/data/prerefactor_records.jsonl, from reports/runs.jsonl at 8b626a5): `harness rerun` replaces a record
    with a post-refactor one under the same key, so reading only today's runs.jsonl would check fewer each time."""
    data = Path(__file__).parent / "data" / "prerefactor_records.jsonl"
    records = [json.loads(line) for line in data.open()]
    assert len(records) == 44 and not any("act" in rec for rec in records)
    for rec in records:
        assert _compose(_record_overrides(rec)).run_key == rec["run_key"], rec["run_key"]
    leaderboard = Path(__file__).parent.parent / "reports" / "runs.jsonl"
    recorded_keys = {json.loads(line)["run_key"] for line in leaderboard.open()}
    assert [rec["run_key"] for rec in records if rec["run_key"] not in recorded_keys] == []
