"""`python -m harness bench runs`: log the per-run latency (harness/evaluate/latency.py) and packed bytes per
weight into finished runs of the tracking store that were logged before those metrics existed."""

from __future__ import annotations

import sys

from harness import models
from harness.spec import BitSpec, ModelSpec
from methods import METHODS


def backfill_latency(tracking_uri: str, experiment: str, reps: int, device: str) -> int:
    """Log latency metrics (and packed bytes per weight) into finished runs logged before these existed.
    Both depend only on the model's shapes and the run's format (bits, group, weight symmetry), so this is
    the measurement the run would have made; such runs are tagged `latency.measured_after_run`."""
    from mlflow import MlflowClient

    from harness.evaluate import latency
    from harness.evaluate.memory import packed_bits_per_weight
    from harness.spec import LatencySpec

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        print(f"error: no experiment {experiment!r} in {tracking_uri}; run a sweep first", file=sys.stderr)
        return 2
    spec = LatencySpec(reps=reps, device=device)
    shapes_by_model: dict[tuple, object] = {}
    measured = 0
    for run in client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", max_results=50000):
        tags, params = run.data.tags, run.data.params
        if "run_key" not in tags:
            continue
        method = tags["method"]
        default_sym = getattr(METHODS[method].config_cls(), "w_sym", False) if method in METHODS else False
        w_sym = params.get("method.w_sym", str(default_sym)) == "True"
        fmt = latency.run_format(BitSpec.parse(tags["bits"]), w_sym)
        if fmt is None:
            continue
        model_key = (params.get("model.name"), params.get("model.id", "None"))
        if model_key not in shapes_by_model:
            model_id = None if model_key[1] in ("None", "null") else model_key[1]
            model, _ = models.load(ModelSpec(model_key[0], id=model_id))
            shapes_by_model[model_key] = latency.block_shapes(model)
        shapes = shapes_by_model[model_key]
        if "packed_bits_per_weight" not in run.data.metrics:  # packed bytes depend on shapes and format only
            packed = packed_bits_per_weight(shapes, fmt.w_bits, fmt.group_size, w_sym)
            client.log_metric(run.info.run_id, "packed_bits_per_weight", packed)
        if "latency.format" in tags:
            continue
        metrics, lat_tags = latency.measure(shapes, fmt, spec)
        for name, value in metrics.items():
            client.log_metric(run.info.run_id, name, value)
        for name, value in {**lat_tags, "latency.measured_after_run": "true"}.items():
            client.set_tag(run.info.run_id, name, value)
        measured += 1
        print(
            f"{tags.get('model')}/{method}/{tags['bits']} ({run.info.run_id[:8]}): {fmt.name} "
            f"prefill {metrics['latency.prefill.speedup']:.2f}x, decode {metrics['latency.decode.speedup']:.2f}x"
        )
    print(f"measured {measured} run(s); `python -m harness report` to refresh the leaderboard")
    return 0
