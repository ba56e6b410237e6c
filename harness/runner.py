"""One configuration end to end: validate, load, quantize, evaluate, log. Plain functions, no globals."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from harness import data, models, validate
from harness.evaluate import steps
from harness.evaluate.memory import PeakRSS, memory_report
from harness.evaluate.perplexity import perplexity
from harness.recipes import spec_is_recipe
from harness.spec import (
    BitSpec,
    CalibSpec,
    DeploySpec,
    LatencySpec,
    ModelSpec,
    PerplexitySpec,
    PluginSpec,
    RunSpec,
    SpecError,
    TrainSpec,
    ZeroShotSpec,
    method_label,
    run_name,
    ui_run_name,
)
from harness.tracking import KeyClaimed, Tracker, flatten, provenance_tags
from methods import METHODS
from methods.act import ACT_QUANTIZERS
from methods.base import MissingLibrary, QuantContext, Request
from methods.core.arch import ARCHS
from methods.core.cpu_gemm import CPU_GEMMS, use_cpu_gemm
from methods.core.params import with_choice_spelling
from methods.core.quantizers import compile_quantizers
from methods.kv import KV_QUANTIZERS

log = logging.getLogger("quantbench")
RESERVED_METHOD_KEYS = ("name",)


@dataclass(frozen=True)
class Outcome:
    run_name: str
    status: str  # finished | diverged | done-before | claimed | unsupported | failed
    detail: str = ""


PLUGINS = {"act": ACT_QUANTIZERS, "kv": KV_QUANTIZERS}


def _entry_and_params(cfg: DictConfig, group: str, registry: dict) -> tuple[str, dict]:
    params = OmegaConf.to_container(cfg[group], resolve=True)
    name = params.pop("name")
    if name not in registry:
        raise SpecError(f"unknown {group} {name!r}; valid: {', '.join(sorted(registry))}")
    params = with_choice_spelling(registry[name].config_cls, params)  # the run key hashes the spelling it runs
    try:
        registry[name].make_config(f"{group} {name!r}", params)
    except (TypeError, ValueError) as err:
        raise SpecError(str(err)) from err
    return name, params


def spec_from_config(cfg: DictConfig) -> RunSpec:
    """Build and validate the RunSpec (raises SpecError with a one-line message naming the fix): first every
    declared rule and relation at once (harness/validate.py), then the checks that need a valid config."""
    method_name = OmegaConf.select(cfg, "method.name")
    trains = method_name in METHODS and METHODS[method_name].trains
    found = validate.problems(cfg, {"method": METHODS, **PLUGINS}, trains)
    if found:
        raise SpecError("invalid configuration: " + "; ".join(found))
    method, method_cfg = _entry_and_params(cfg, "method", METHODS)
    plugins = {group: PluginSpec(*_entry_and_params(cfg, group, registry)) for group, registry in PLUGINS.items()}
    bits = BitSpec.parse(cfg.bits)
    model = ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True))
    models.check_model_spec(model)
    calib = CalibSpec(**OmegaConf.to_container(cfg.calib, resolve=True))
    data.check_calib_spec(calib)
    ppl_cfg = OmegaConf.to_container(cfg.eval.ppl, resolve=True)
    ppl = PerplexitySpec(max_windows=cfg.budget.ppl_max_windows, **ppl_cfg)
    if ppl.dataset not in data.PPL_DATASETS:
        raise SpecError(f"unknown perplexity dataset {ppl.dataset!r}; valid: {', '.join(data.PPL_DATASETS)}")
    models.torch_dtype(ppl.dtype)
    zs_cfg = OmegaConf.to_container(cfg.eval.zeroshot, resolve=True) if "zeroshot" in cfg.eval else {}
    zeroshot = ZeroShotSpec(
        tasks=tuple(zs_cfg.get("tasks") or ()),
        limit=zs_cfg.get("limit"),
        batch_size=int(zs_cfg.get("batch_size", 8)),
        sample=zs_cfg.get("sample"),
        sample_seed=int(zs_cfg.get("sample_seed", 0)),
    )
    if zeroshot.limit is not None and zeroshot.sample is not None:
        raise SpecError(
            f"eval.zeroshot.limit={zeroshot.limit} and eval.zeroshot.sample={zeroshot.sample} are both set: limit "
            "scores each task's first documents, sample a seeded subset (eval=zs1k); set one of them to null"
        )
    if zeroshot.tasks:
        from harness.evaluate.zeroshot import TaskUnavailable, check_tasks

        try:
            check_tasks(list(zeroshot.tasks), cfg.data_dir)
        except TaskUnavailable as err:
            raise SpecError(str(err)) from err
    train = None
    if METHODS[method].trains:
        train = TrainSpec(**OmegaConf.to_container(cfg.train, resolve=True))
        data.check_calib_spec(CalibSpec(train.dataset, train.windows, train.seqlen))
    lat_cfg = OmegaConf.to_container(cfg.eval.latency, resolve=True) if "latency" in cfg.eval else {"enabled": False}
    latency = LatencySpec(**{**lat_cfg, "tokens": tuple(lat_cfg.get("tokens", LatencySpec.tokens))})
    deploy = (
        DeploySpec(**OmegaConf.to_container(cfg.eval.deploy, resolve=True)) if "deploy" in cfg.eval else DeploySpec()
    )
    return RunSpec(
        model=model,
        method=method,
        method_params=method_cfg,
        bits=bits,
        calib=calib,
        ppl=ppl,
        zeroshot=zeroshot,
        seed=_integer("seed", cfg.seed),
        budget=str(cfg.budget.name),
        act=plugins["act"],
        kv=plugins["kv"],
        train=train,
        data_dir=cfg.data_dir,
        latency=latency,
        deploy=deploy,
        compile_quantizers=_compile_quantizers(cfg.eval.get("compile_quantizers", "auto"), ppl.max_windows),
        fidelity=_boolean("eval.fidelity", cfg.eval.get("fidelity", True)),
        cpu_gemm=_cpu_gemm(cfg.get("cpu_gemm", "onednn")),
    )


COMPILE_MIN_WINDOWS = 16


def _cpu_gemm(name) -> str:
    if name not in CPU_GEMMS:
        raise SpecError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}, got {name!r}")
    return str(name)


def _boolean(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{key} must be true or false, got {value!r}")
    return value


def _integer(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
        raise SpecError(f"{key} must be an integer, got {value!r} (e.g. {key}=0; a sweep: {key}=0,1,2)")
    return int(value)


def _compile_quantizers(setting, max_windows: int | None) -> bool:
    """`eval.compile_quantizers`: true, false, or auto = compile when the evaluation is long enough to pay back
    compiling (~5-10 s per process and quantizer variant): the whole split or at least 16 windows."""
    if setting == "auto":
        return max_windows is None or max_windows >= COMPILE_MIN_WINDOWS
    if isinstance(setting, bool):
        return setting
    raise SpecError(f"eval.compile_quantizers must be true, false or auto, got {setting!r}")


def build_plugins(spec: RunSpec) -> tuple:
    """(act quantizer or None, KV quantizer or None): built only where the bits quantize activations / KV."""
    built = []
    for group, plugin, used in (("act", spec.act, spec.bits.a), ("kv", spec.kv, spec.bits.kv)):
        entry = PLUGINS[group][plugin.name]
        config = entry.make_config(f"{group} {plugin.name!r}", plugin.params)
        built.append(entry.build(config, used) if used < 16 else None)
    return tuple(built)


def check_library(method: str) -> None:
    """A peer method's library, before anything loads: one line naming the environment that has it."""
    import importlib.util

    entry = METHODS[method]
    if entry.requires is not None and importlib.util.find_spec(entry.requires) is None:
        raise MissingLibrary(
            f"method={method} runs the `{entry.requires}` package, which this environment lacks: run it in the "
            f"`{entry.environment}` environment (`nox -s {entry.environment}` builds it; then "
            f".nox/{entry.environment}/bin/python -m harness sweep method={method} ...)"
        )


def check_supported(spec: RunSpec, need_library: bool = True) -> None:
    """The method's library (unless `need_library` is False) and `supports` on the full request (bits, architecture
    family, plug-ins), before loading."""
    if need_library:
        check_library(spec.method)
    act, kv = build_plugins(spec)
    METHODS[spec.method].supports(Request(spec.bits, ARCHS[models.family(spec.model)], act, kv))


def run_datasets(spec: RunSpec, read_calibration: bool) -> list[tuple[str, str, str, str]]:
    """(name, digest, source, context) of the data a run read: the evaluation split, the calibration windows when
    the method or a plug-in read them, the training windows of a training method (digest: their spec and seed;
    source: the mirror, or the hub)."""
    import hashlib

    def digest(*parts) -> str:
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]

    source = spec.data_dir or "huggingface-hub"
    windows = "whole" if spec.ppl.max_windows is None else f"first {spec.ppl.max_windows}"
    data = [(f"{spec.ppl.dataset}-test ({windows} x {spec.ppl.seqlen})", digest(spec.ppl), source, "evaluation")]
    calib = spec.calib
    if read_calibration:
        name = f"{calib.dataset} ({calib.nsamples} x {calib.seqlen}, seed {spec.seed})"
        data.append((name, digest(calib, spec.seed), source, "calibration"))
    if spec.train is not None:
        train = spec.train
        data.append(
            (
                f"{train.dataset} ({train.windows} x {train.seqlen}, seed {spec.seed})",
                digest(train, spec.seed),
                source,
                "training",
            )
        )
    return data


def execute(spec: RunSpec, cfg: DictConfig, tracker: Tracker, force: bool = False) -> Outcome:
    """Run one spec unless its key already finished; failures end FAILED in MLflow and are returned."""
    name = run_name(spec)
    try:
        check_supported(spec)
    except ValueError as err:
        return Outcome(name, "unsupported", str(err))
    if not force and tracker.finished_run_id(spec.run_key):
        return Outcome(name, "done-before", f"run key {spec.run_key} already finished")
    params = {
        k: v
        for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items()
        if k not in ("force", "tracking_uri")
    }
    tags = {
        "model": spec.model.id or spec.model.name,
        "method": spec.method,
        "method_label": method_label(spec),
        "bits": str(spec.bits),
        "budget": spec.budget,
        **provenance_tags(spec.model.device),
    }
    try:
        yaml = OmegaConf.to_yaml(cfg, resolve=True)
        with tracker.run(spec.run_key, ui_run_name(spec), params, tags, yaml, redo_finished=force):
            with use_cpu_gemm(spec.cpu_gemm):
                diverged = _quantize_and_evaluate(spec, tracker)
    except KeyClaimed as err:  # another worker runs (or just finished) this key
        return Outcome(name, "claimed", str(err))
    except Exception as err:  # logged FAILED by the tracker; the sweep goes on
        log.exception("run %s failed", name)
        return Outcome(name, "failed", f"{type(err).__name__}: {err}".splitlines()[0])
    return Outcome(name, "diverged", diverged) if diverged else Outcome(name, "finished")


def _quantize_and_evaluate(spec: RunSpec, tracker: Tracker) -> str | None:
    """Quantize, evaluate, log. Returns None, or where the model diverged (the run then ends FINISHED with the
    tag outcome=DIVERGED: a result, not a failure to retry)."""
    torch.manual_seed(spec.seed)
    start = time.perf_counter()
    model, tokenizer = models.load(spec.model)
    tracker.log_metrics({"load_seconds": time.perf_counter() - start})
    token_ids = data.ppl_token_ids(spec.ppl.dataset, tokenizer, spec.data_dir)
    fidelity = steps.fidelity_observer(spec, model, token_ids)  # before quantizing: the FP model's reference

    entry = METHODS[spec.method]
    config = entry.make_config(spec.method, spec.method_params)
    drawn: list[int] = []  # calibration windows the method actually read (0 for data-free methods)
    ctx = make_context(spec, tokenizer, drawn, tracker.log_step_metrics)
    kv = ctx.kv
    with PeakRSS() as rss_quant:
        start = time.perf_counter()
        summary = apply(model, entry, config, spec.bits, ctx)
        quantize_seconds = time.perf_counter() - start
    tracker.log_metrics(
        {
            "quantize_seconds": quantize_seconds,
            "peak_rss_quantize_mb": rss_quant.peak_mb,
            "calib_windows": float(drawn[-1] if drawn else 0),
            **summary.metrics,
        }
    )
    if summary.notes:
        tracker.set_tags({f"note.{k}": v for k, v in summary.notes.items()})
    for name, text in summary.artifacts.items():
        tracker.log_text(name, text)
    read_data = bool(drawn) or spec.train is not None
    tracker.set_tags({"recipe": str(spec_is_recipe(spec, read_data)).lower()})  # harness/recipes.py
    steps.contamination(spec, bool(drawn), tracker)
    tracker.log_datasets(run_datasets(spec, read_calibration=bool(drawn)))

    report = memory_report(model, kv_bytes_per_token=kv.bytes_per_token(model) if kv else None)
    tracker.log_metrics(report.metrics())
    tracker.set_tags({"sixteen_bit_layers": report.sixteen_bit_layers})
    if spec.latency.enabled:
        steps.latency(spec, model, tracker)

    model.to(models.torch_dtype(spec.ppl.dtype))
    compile_quantizers(spec.compile_quantizers)
    with PeakRSS() as rss_eval:
        result = perplexity(
            model, token_ids, spec.ppl.seqlen, spec.ppl.batch_size, spec.ppl.max_windows, on_chunk=fidelity
        )
    if result.diverged:
        return steps.diverged(spec, model, token_ids, result, tracker)
    tracker.log_metrics(
        {
            f"{spec.ppl.dataset}_ppl": result.ppl,
            "ppl_nll": result.nll,
            "ppl_windows": result.windows,
            "ppl_tokens_scored": result.tokens_scored,
            "ppl_tokens_total": result.tokens_total,
            "ppl_seconds": result.seconds,
            "ppl_tokens_per_second": result.tokens_per_second,
            "peak_rss_eval_mb": rss_eval.peak_mb,
            **steps.fidelity_metrics(spec, fidelity),
        }
    )
    tracker.log_series("ppl_window_nll", result.window_nll)  # per window: paired tests between runs (report)
    log.info(
        "%s: %s PPL %.4f over %d windows (%.1f s)",
        run_name(spec),
        spec.ppl.dataset,
        result.ppl,
        result.windows,
        result.seconds,
    )
    if spec.zeroshot.tasks:
        steps.zeroshot(spec, model, tokenizer, tracker, result.window_nll)
    if spec.deploy.enabled:
        steps.deploy(spec, model, token_ids, tracker)
    return None


def make_context(spec: RunSpec, tokenizer, drawn: list[int] | None = None, log_step=None) -> QuantContext:
    """What the method receives: lazy seeded calibration windows (their count appended to `drawn` when read),
    training windows for methods that train, the act/KV plug-ins, a per-run checkpoint directory."""

    def calibration():
        windows = data.calibration_windows(spec.calib, tokenizer, spec.seed, spec.data_dir)
        if drawn is not None:
            drawn.append(len(windows))
        return windows

    def training():
        return data.training_windows(spec.train, tokenizer, spec.seed, spec.data_dir)

    act, kv = build_plugins(spec)
    return QuantContext(
        seed=spec.seed,
        calibration=calibration,
        tokenizer=tokenizer,
        act=act,
        kv=kv,
        training=training if spec.train is not None else None,
        training_rows=(lambda: data.corpus_rows(spec.train.dataset, spec.data_dir)) if spec.train is not None else None,
        log_step=log_step,
        checkpoint_dir=str(models.cache_dir() / "checkpoints" / spec.run_key),
        cache_dir=str(models.cache_dir()),
    )


def apply(model, entry, config, bits: BitSpec, ctx: QuantContext):
    """The weight method, then the act/KV plug-ins it was handed (fitted on calibration data if they need it,
    then attached — idempotent, so a method may have attached them itself). Returns the method's summary, with
    the plug-ins' own notes, measurements and artifacts (`notes()`, `metrics()`, `artifacts()`, when they have
    them) added."""
    summary = entry.quantize(model, config, bits, ctx)
    for plugin in (ctx.act, ctx.kv):
        if plugin is not None:
            if plugin.needs_calibration:
                plugin.fit(model, ctx.calibration())
            plugin.attach(model)
            summary.notes.update(plugin.notes() if hasattr(plugin, "notes") else {})
            summary.metrics.update(plugin.metrics() if hasattr(plugin, "metrics") else {})
            summary.artifacts.update(plugin.artifacts() if hasattr(plugin, "artifacts") else {})
    return summary
