"""Which runs are a method's recipe (issue 49): its registered default configuration at its family's declared
budget (`conf/recipes.yaml`), nothing overridden but the bits and the seed. The leaderboard's headline, the Pareto
plot's main panels and the "nearest other method" comparison show recipes only; every other configuration is a
variant and is shown with the number of configurations a best-of cell was chosen from.

The runner tags each run `recipe=true|false` when it ends; the report derives the same answer from a record's
logged parameters (`is_recipe`), against today's recipe, so runs logged before the tag are classified and a run
whose method's defaults have since changed counts as a variant.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from harness.labels import changed_params
from harness.spec import BitSpec

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
RECIPES_FILE = CONF_DIR / "recipes.yaml"
FAMILIES = ("ptq", "qat", "kv")
CALIB_FIELDS = ("calib_dataset", "calib_nsamples", "calib_seqlen")


@functools.cache
def family_budgets() -> dict[str, str]:
    budgets = dict(OmegaConf.to_container(OmegaConf.load(RECIPES_FILE))["budgets"])
    if sorted(budgets) != sorted(FAMILIES):
        raise ValueError(f"{RECIPES_FILE} must declare a budget for each of {', '.join(FAMILIES)}")
    return budgets


def family(method: str, kv_name: str | None) -> str:
    """The method's registered family (`qat` for the QAT methods), `kv` for a PTQ column whose KV plug-in
    calibrates (KVQuant), else `ptq`."""
    from methods import METHODS
    from methods.kv import KV_QUANTIZERS

    if METHODS[method].family != "ptq":
        return METHODS[method].family
    entry = KV_QUANTIZERS.get(kv_name or "rtn")
    if entry is not None and entry.build(entry.config_cls(), 4).needs_calibration:
        return "kv"
    return "ptq"


@dataclass(frozen=True)
class Reference:
    """A recipe's configuration as runs log it: flattened method parameters, plug-ins and calibration, as text."""

    budget: str
    method_params: dict[str, str]
    plugins: dict[str, dict[str, str]]
    calib: dict[str, str]
    train: dict[str, str]


def _text(value) -> str:
    return "null" if value is None else str(value)


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import harness.configs  # noqa: F401  (the structured configs)

    if GlobalHydra.instance().is_initialized():  # inside a Hydra job: its config dir is ours
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@functools.cache
def reference(method: str, act: str, kv: str) -> Reference:
    """The recipe of `method` with these plug-ins, composed as a run with no other override would be."""
    from harness.tracking import flatten

    budget = family_budgets()[family(method, kv)]
    cfg = OmegaConf.to_container(
        _compose([f"method={method}", f"act={act}", f"kv={kv}", f"budget={budget}"]), resolve=True
    )
    method_params = {k: _text(v) for k, v in flatten(cfg["method"]).items() if k != "name"}
    plugins = {group: {k: _text(v) for k, v in cfg[group].items()} for group in ("act", "kv")}
    calib = {
        "calib_dataset": cfg["calib"]["dataset"],
        "calib_nsamples": _text(cfg["calib"]["nsamples"]),
        "calib_seqlen": _text(cfg["calib"]["seqlen"]),
    }
    return Reference(budget, method_params, plugins, calib, {k: _text(v) for k, v in cfg["train"].items()})


def matches_recipe(
    method: str,
    bits: str,
    method_params: dict[str, str],
    plugins: dict[str, dict[str, str] | None],
    protocol: dict[str, str],
    read_data: bool,
    train: dict[str, str] | None = None,
) -> bool:
    """True when a run's logged configuration is its method's recipe: no method parameter differs from the
    recipe's (parameters added after the run count at their legacy value, inert ones are skipped, as labels do),
    the plug-ins the bits use carry the recipe's settings (the method's act/KV recipe, e.g. QuaRot's clips), and
    the run's budget is its family's, with that budget's calibration (and, where logged, training) data; a run
    that read no data is the recipe at any budget."""
    from methods import METHODS

    if method not in METHODS:
        return False
    spec = BitSpec.parse(bits)
    used = {"act": spec.quantizes_activations, "kv": spec.quantizes_kv}
    names = {group: (plugins.get(group) or {}).get("name", "rtn") for group in ("act", "kv")}
    ref = reference(method, names["act"], names["kv"])
    if changed_params(method, method_params, ref.method_params):
        return False
    for group, in_use in used.items():
        logged = plugins.get(group)
        if in_use and (logged is None or any(logged.get(k) != v for k, v in ref.plugins[group].items())):
            return False
    if not read_data:
        return True
    if str(protocol.get("budget")) != ref.budget or any(str(protocol.get(k)) != v for k, v in ref.calib.items()):
        return False
    return not (train and METHODS[method].trains and any(train.get(k) != v for k, v in ref.train.items()))


def is_recipe(rec: dict) -> bool:
    """`matches_recipe` of an exported record (`reports/runs.jsonl`)."""
    from methods import METHODS

    trains = rec["method"] in METHODS and METHODS[rec["method"]].trains
    read_data = trains or rec["metrics"].get("calib_windows", 1) != 0
    plugins = {group: rec.get(group) for group in ("act", "kv")}
    return matches_recipe(
        rec["method"], rec["bits"], rec["method_params"], plugins, rec["protocol"], read_data, rec.get("train")
    )


def spec_is_recipe(spec, read_data: bool) -> bool:
    """`matches_recipe` of a run about to be logged (`harness.spec.RunSpec`; the runner's `recipe` tag)."""
    from dataclasses import asdict

    from harness.tracking import flatten

    def text(mapping: dict) -> dict[str, str]:
        return {k: _text(v) for k, v in flatten(mapping).items()}

    plugins = {
        group: {"name": plugin.name, **text(plugin.params)} for group, plugin in (("act", spec.act), ("kv", spec.kv))
    }
    calib = spec.calib
    protocol = {
        "budget": spec.budget,
        "calib_dataset": calib.dataset,
        "calib_nsamples": _text(calib.nsamples),
        "calib_seqlen": _text(calib.seqlen),
    }
    train = text(asdict(spec.train)) if spec.train is not None else None
    return matches_recipe(spec.method, str(spec.bits), text(spec.method_params), plugins, protocol, read_data, train)
