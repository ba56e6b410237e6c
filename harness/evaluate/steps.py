"""A run's evaluation steps beyond perplexity, each logging what it measured to the tracker: the record of a
diverged model, the contamination guard, kernel latency, deployed mode, zero-shot tasks, fidelity to FP."""

from __future__ import annotations

import logging

from harness import models
from harness.spec import RunSpec, run_name
from harness.tracking import Tracker

log = logging.getLogger("quantbench")


def diverged(spec: RunSpec, model, token_ids, result, tracker: Tracker) -> str:
    """Record a collapsed model: no perplexity metric, the outcome and where the first nan/inf appeared."""
    from harness.evaluate.divergence import divergence_message

    first = result.nonfinite_window * spec.ppl.seqlen
    message = divergence_message(model, token_ids[:, first : first + spec.ppl.seqlen], result.nonfinite_window)
    tracker.set_tags({"outcome": "DIVERGED", "error": message})
    tracker.log_metrics({"ppl_seconds": result.seconds, "diverged_window": float(result.nonfinite_window)})
    log.warning("%s: DIVERGED: %s", run_name(spec), message)
    return message


def contamination(spec: RunSpec, read_calibration: bool, tracker: Tracker) -> None:
    """13-gram overlap of the corpora the method read with the evaluation split (harness.contamination)."""
    from harness.contamination import run_metrics

    sources = {"calib": spec.calib.dataset} if read_calibration else {}
    if spec.train is not None:
        sources["train"] = spec.train.dataset
    if not sources:
        return
    metrics, warnings = run_metrics(sources, spec.ppl.dataset, spec.data_dir)
    tracker.log_metrics(metrics)
    if warnings:
        tracker.set_tags(warnings)
        for message in warnings.values():
            log.warning("%s: contamination: %s", run_name(spec), message)


def latency(spec: RunSpec, model, tracker: Tracker) -> None:
    from harness.evaluate import latency

    fmt = latency.model_format(model, spec.bits.a)
    if fmt is None:
        return
    if fmt == latency.NO_KERNEL:
        tracker.set_tags({"latency.format": latency.NO_KERNEL})
        log.info("%s: no kernel for this weight format; latency not measured", run_name(spec))
        return
    metrics, tags = latency.measure(latency.block_shapes(model), fmt, spec.latency)
    tracker.log_metrics(metrics)
    tracker.set_tags(tags)
    log.info(
        "%s: %s kernel vs %s dense: prefill %.2fx, decode %.2fx",
        run_name(spec),
        fmt.name,
        tags["latency.dense_dtype"],
        metrics.get("latency.prefill.speedup", float("nan")),
        metrics.get("latency.decode.speedup", float("nan")),
    )


def deploy(spec: RunSpec, model, token_ids, tracker: Tracker) -> None:
    """Deployed mode: packed kernels, the check (a mismatch fails the run, its numbers logged first), generation
    speed against the bf16 model."""
    from harness.evaluate import deploy

    sixteen_bit, _ = models.load(spec.model)
    metrics, tags = deploy.evaluate_deployed(model, sixteen_bit, token_ids, spec.ppl.seqlen, spec.deploy)
    tracker.log_metrics(metrics)
    tracker.set_tags(tags)
    if "deploy.error" in tags:
        raise deploy.DeploymentMismatch(tags["deploy.error"])
    log.info(
        "%s: deployed (%d/%d linears on kernels %s): PPL %.4f vs fake-quant bf16 %.4f; decode %.1f tok/s "
        "(%.2fx bf16), prefill %.1f tok/s (%.2fx)",
        run_name(spec),
        metrics["deploy.linears_on_kernel"],
        metrics["deploy.linears_total"],
        tags["deploy.kernels"],
        metrics["deploy.ppl"],
        metrics["deploy.fake_bf16_ppl"],
        metrics["deploy.deploy.decode_tok_s"],
        metrics["deploy.decode.speedup"],
        metrics["deploy.deploy.prefill_tok_s"],
        metrics["deploy.prefill.speedup"],
    )


def zeroshot(spec: RunSpec, model, tokenizer, tracker: Tracker, window_nll: tuple[float, ...]) -> None:
    """lm-eval's tasks on the in-memory model, resumable: a killed attempt at this run key on the same model (same
    per-window NLLs: `zeroshot.model_fingerprint`) left its finished tasks and cached responses, which are used."""
    from harness.evaluate.shared_prefix import scorer_for
    from harness.evaluate.zeroshot import ScoreCache, evaluate_zeroshot, model_fingerprint
    from harness.records import ZS_DOC_PREFIX

    cache = ScoreCache(models.cache_dir() / "zeroshot", spec.run_key, model_fingerprint(spec.run_key, window_nll))
    done = cache.load()
    if done:
        log.info("%s: zero-shot tasks %s scored by an earlier attempt on the same model", run_name(spec), sorted(done))
    scorer, scoring = scorer_for(model)
    scores = evaluate_zeroshot(
        model,
        tokenizer,
        list(spec.zeroshot.tasks),
        spec.data_dir,
        spec.zeroshot.batch_size,
        spec.zeroshot.limit,
        cache=cache,
        sample=spec.zeroshot.sample,
        sample_seed=spec.zeroshot.sample_seed,
        scorer=scorer,
    )
    metrics, tags = {}, {"zs.scoring": scoring}
    for score in scores:
        for name, value in score.all_metrics.items():
            metrics[f"zs.{score.task}.{name}"] = value
        metrics[f"zs.{score.task}.seconds"] = score.seconds
        tags[f"zs.{score.task}.config_hash"] = score.config_hash
        tags[f"zs.{score.task}.metric"] = score.metric
        log.info("%s: %s %s %.4f", run_name(spec), score.task, score.metric, score.value)
    for score in scores:  # per document: paired comparisons between runs scored on the same documents (report)
        tracker.log_series(f"{ZS_DOC_PREFIX}{score.task}.id", score.documents)
        tracker.log_series(f"{ZS_DOC_PREFIX}{score.task}.correct", score.correct)
    metrics["zs.avg"] = sum(s.value for s in scores) / len(scores)
    if done:  # the record says which scores an earlier attempt on the same model measured
        tags["zs.from_earlier_attempt"] = ", ".join(sorted(done))
    tracker.log_metrics(metrics)
    tracker.set_tags(tags)
    cache.clear()  # recorded in the run: a forced rerun evaluates afresh


def _is_fp_run(spec: RunSpec) -> bool:
    return spec.method == "rtn" and spec.bits.w >= 16 and spec.bits.a >= 16 and spec.bits.kv >= 16


def fidelity_observer(spec: RunSpec, model, token_ids):
    """The perplexity pass's fidelity observer (harness/evaluate/fidelity.py), or None when `eval.fidelity` is off:
    a comparer against the cached FP reference; for the FP run itself, a recorder that writes the reference;
    otherwise the reference is built now, from the model as loaded (before any quantization), once per model
    and protocol."""
    import copy
    import time

    from harness.evaluate import fidelity
    from harness.evaluate.perplexity import perplexity

    if not spec.fidelity:
        return None
    windows = token_ids.shape[1] // spec.ppl.seqlen
    windows = windows if spec.ppl.max_windows is None else min(windows, spec.ppl.max_windows)
    label = spec.model.name if spec.model.id is None else f"{spec.model.name}-{spec.model.id}"
    if spec.model.name.startswith("tiny"):
        label += f"-seed{spec.model.seed}"
    path = fidelity.reference_path(
        models.cache_dir(), label, spec.ppl.dataset, spec.ppl.seqlen, windows, spec.ppl.dtype
    )
    reference = fidelity.Reference.load(path)
    if reference is not None:
        return fidelity.Comparer(reference)
    recorder = fidelity.Recorder(windows, spec.ppl.seqlen - 1, path=path)
    if _is_fp_run(spec):
        return recorder
    log.info(
        "%s: building the FP reference for KL/top-1 (%d windows, once per model and protocol)", run_name(spec), windows
    )
    dtype = models.torch_dtype(spec.ppl.dtype)
    fp_model = model if next(model.parameters()).dtype == dtype else copy.deepcopy(model).to(dtype)
    start = time.perf_counter()
    perplexity(fp_model, token_ids, spec.ppl.seqlen, spec.ppl.batch_size, spec.ppl.max_windows, on_chunk=recorder)
    recorder.reference().save(path)
    log.info("%s: FP reference written to %s (%.0f s)", run_name(spec), path, time.perf_counter() - start)
    return fidelity.Comparer(recorder.reference())


def fidelity_metrics(spec: RunSpec, observer) -> dict[str, float]:
    """`kl_vs_fp` (mean nats per predicted token) and `top1_vs_fp` from the pass; the FP run saves the reference
    it recorded (its own KL is 0 and agreement 1 by definition)."""
    from harness.evaluate import fidelity

    if observer is None:
        return {}
    if isinstance(observer, fidelity.Recorder):
        observer.reference().save(observer.path)
        return {"kl_vs_fp": 0.0, "top1_vs_fp": 1.0}
    return observer.metrics()
