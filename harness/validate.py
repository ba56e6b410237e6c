"""Planning-time validation of one composed configuration (issue 48): every value against the rule its field
declares (`methods.core.params.valid`: the run, model, calibration, evaluation, training settings, the method's and
the plug-ins' configs, their nested settings blocks) and the relations that need the model's config but not its
weights — windows no longer than the model's context length or the calibration corpus, a group no wider than the
narrowest decoder linear. All problems of a configuration come back together, so one message names each.
"""

from __future__ import annotations

import functools

from omegaconf import DictConfig, OmegaConf

from harness import data, models
from harness.spec import (
    BitSpec,
    CalibSpec,
    DeploySpec,
    LatencySpec,
    ModelSpec,
    PerplexitySpec,
    SpecError,
    TrainSpec,
    ZeroShotSpec,
)
from harness.tracking import tracking_uri_problem
from methods.core.params import violations


def problems(cfg: DictConfig, registries: dict[str, dict], trains: bool) -> list[str]:
    """Every problem of the composed config `cfg`, one phrase each; [] when it can be planned. `registries`:
    group ("method", "act", "kv") -> its registry; `trains`: the method reads training windows."""
    found: list[str] = []
    for group, registry in registries.items():
        found += _registered(cfg, group, registry)
    blocks = {
        "model": (ModelSpec, cfg.model),
        "calib": (CalibSpec, cfg.calib),
        "eval.ppl": (PerplexitySpec, {**_plain(cfg.eval.ppl), "max_windows": cfg.budget.ppl_max_windows}),
        "eval.zeroshot": (ZeroShotSpec, cfg.eval.get("zeroshot")),
        "eval.latency": (LatencySpec, cfg.eval.get("latency")),
        "eval.deploy": (DeploySpec, cfg.eval.get("deploy")),
        "train": (TrainSpec, cfg.train if trains else None),
    }
    built = {}
    for prefix, (spec_cls, node) in blocks.items():
        if node is None:
            continue
        values = _plain(node)
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        try:
            built[prefix] = spec_cls(**values)
        except TypeError as err:
            found.append(f"{prefix}: {err}")
            continue
        wrong = violations(built[prefix], f"{prefix}.")
        if wrong:  # no relation is checked on a block with a wrong value
            found += wrong
            del built[prefix]
    uri_problem = tracking_uri_problem(str(cfg.tracking_uri))
    if uri_problem:
        found.append(uri_problem)
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        found.append(f"seed must be an integer, got {seed!r} (e.g. seed=0; a sweep: seed=0,1,2)")
    elif seed < 0:
        found.append(f"seed={seed} (must be >= 0)")
    return found + _relations(cfg, built)


def _plain(node) -> dict:
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _registered(cfg: DictConfig, group: str, registry: dict) -> list[str]:
    params = _plain(cfg[group])
    name = params.pop("name", None)
    if name not in registry:
        return [f"unknown {group} {name!r} (valid: {', '.join(sorted(registry))})"]
    try:
        registry[name].make_config(f"{group} {name!r}", params)
    except (TypeError, ValueError) as err:
        return [str(err)]
    return []


def _relations(cfg: DictConfig, built: dict) -> list[str]:
    """Windows vs the model's context and the corpus, group size vs the layer widths."""
    if "model" not in built:
        return []
    try:
        shape = models.shape(built["model"])
    except SpecError:  # a hub model without hub access: `check_supported` names it when the run is planned
        shape = None
    found = []
    windows = [
        (f"{prefix}.seqlen", built[prefix].seqlen) for prefix in ("calib", "eval.ppl", "train") if prefix in built
    ]
    if shape is not None:
        found += [
            f"{name}={seqlen} (must be <= {shape.context}, the model's context length)"
            for name, seqlen in windows
            if seqlen > shape.context
        ]
    corpus = _corpus_bytes(cfg.calib.dataset, cfg.data_dir) if cfg.data_dir else None
    if corpus is not None:
        found += [
            f"{name}={seqlen} (must be < {corpus:,}, the {cfg.calib.dataset} corpus's length)"
            for name, seqlen in windows
            if name != "eval.ppl.seqlen" and seqlen >= corpus
        ]
    try:
        bits = BitSpec.parse(cfg.bits)
    except SpecError:
        return found  # the bits' own message comes from the spec
    if shape is not None and bits.group is not None and bits.group > shape.min_width:
        found.append(
            f"bits={cfg.bits}: group {bits.group} (must be <= {shape.min_width}, the narrowest decoder linear's "
            "input width)"
        )
    return found


@functools.cache
def _corpus_bytes(dataset: str, data_dir: str) -> int | None:
    """An upper bound on the corpus's token count (UTF-8 bytes: no tokenizer yields more tokens than bytes);
    None for a dataset that is not a calibration corpus (its own check names it)."""
    if dataset not in data.CALIB_DATASETS:
        return None
    try:
        return len(data.calibration_text(dataset, data_dir).encode())
    except (OSError, SpecError):
        return None
