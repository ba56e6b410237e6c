"""quantbench command line.

python -m harness run    [key=value ...]     one configuration (run --help: the keys and examples)
python -m harness sweep  [key=value ...]     comma lists expand to the cross product (Hydra multirun)
python -m harness report [--check]           MLflow runs -> reports/runs.jsonl, leaderboard.md, pareto.png
python -m harness sync   [--tracking-uri U]  upload runs spooled while the tracking store was unreachable
python -m harness contamination             13-gram overlap of each calibration corpus with the test split
python -m harness ui                         MLflow UI on 127.0.0.1 against the configured store
python -m harness list                       models, methods, act/kv plug-ins, budgets, bit grammar
python -m harness bench  forward|load|kernels|runs   timings (bench --help)
python -m harness sensitivity [--windows N] key=value ...   per-block KL/PPL of one setting (sensitivity --help)
python -m harness rerun  [KEY ...] [--missing METRIC] [--print]   re-run recorded runs under today's code
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from harness.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI

COMMANDS = ("run", "sweep", "report", "sync", "contamination", "ui", "list", "bench", "sensitivity", "rerun")


def _tracking_uri(value: str | None) -> str:
    return value or os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command in ("run", "sweep"):
        from harness import cli_sweep, data

        data.absolute_mirror_env()
        return cli_sweep.main(rest, multirun=command == "sweep")
    if command == "report":
        from harness import report

        return report.main(rest)
    if command == "bench":
        from harness import bench

        return bench.main(rest)
    if command == "sensitivity":
        from harness import sensitivity

        return sensitivity.main(rest)
    if command == "rerun":
        from harness import data, rerun

        data.absolute_mirror_env()
        return rerun.main(rest)
    if command == "sync":
        return _sync(rest)
    if command == "contamination":
        return _contamination(rest)
    if command == "ui":
        parser = argparse.ArgumentParser(prog="python -m harness ui")
        parser.add_argument("--tracking-uri", default=None)
        parser.add_argument("--port", default="5000")
        args = parser.parse_args(rest)
        uri = _tracking_uri(args.tracking_uri)
        print(f"MLflow UI for {uri}: the runs table is http://127.0.0.1:{args.port}/{_runs_table(uri)}")
        return subprocess.call(
            [
                sys.executable,
                "-m",
                "mlflow",
                "ui",
                "--backend-store-uri",
                uri,
                "--host",
                "127.0.0.1",
                "--port",
                args.port,
            ]
        )
    return _list()


# MLflow (>= 3.15) restores a runs-table view from the experiment tag `mlflow.sharedViewState.<key>` when the page
# is opened with `?viewStateShareKey=<key>` (its "share view" feature): the columns a person compares methods by
# come first, sorted by perplexity. Column keys are MLflow's `metrics.`name`` / `tags.`name`` sort keys.
LEADERBOARD_VIEW_KEY = "quantbench-leaderboard"
_LEADERBOARD_COLUMNS = [
    "metrics.`wikitext2_ppl`",
    "metrics.`kl_vs_fp`",
    "metrics.`top1_vs_fp`",
    "metrics.`bits_per_weight`",
    "metrics.`kv_bytes_per_token`",
    "metrics.`quantize_seconds`",
    "tags.`model`",
    "tags.`budget`",
]
LEADERBOARD_VIEW = {
    "selectedColumns": _LEADERBOARD_COLUMNS,
    "columnOrder": _LEADERBOARD_COLUMNS,
    "orderByKey": "metrics.`wikitext2_ppl`",
    "orderByAsc": True,
}


def _runs_table(tracking_uri: str) -> str:
    """The URL fragment of the quantbench experiment's runs table with the leaderboard view (MLflow 3 otherwise
    opens on its GenAI overview, empty for our runs, and shows no metric columns); the experiment page if the
    store has no quantbench experiment yet."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///") :]).exists():
        return "#/experiments"  # no store yet (and asking would create one)
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
        if found is not None:
            view = json.dumps(LEADERBOARD_VIEW, separators=(",", ":"))
            client.set_experiment_tag(found.experiment_id, f"mlflow.sharedViewState.{LEADERBOARD_VIEW_KEY}", view)
    except Exception:  # an unreachable store: the UI will say so itself
        found = None
    if found is None:
        return "#/experiments"
    return f"#/experiments/{found.experiment_id}/runs?viewStateShareKey={LEADERBOARD_VIEW_KEY}"


def _sync(argv: list[str]) -> int:
    from harness import spool
    from harness.tracking import StoreUnreachable, Tracker

    parser = argparse.ArgumentParser(prog="python -m harness sync")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    args = parser.parse_args(argv)
    uri = _tracking_uri(args.tracking_uri)
    try:
        tracker = Tracker(uri, args.experiment)
    except StoreUnreachable as err:
        print(f"error: {err}; the spooled runs stay in {spool.spool_dir()}", file=sys.stderr)
        return 2
    uploaded = spool.sync(tracker)
    for line in uploaded:
        print(f"uploaded {line}")
    others = len(spool.pending())
    print(f"{len(uploaded)} spooled run(s) uploaded to {uri}" + (f"; {others} for other stores left" if others else ""))
    return 0


def _contamination(argv: list[str]) -> int:
    from harness import contamination, data

    parser = argparse.ArgumentParser(prog="python -m harness contamination")
    parser.add_argument("--data-dir", default=None, help="data mirror (default: QUANTBENCH_DATA)")
    args = parser.parse_args(argv)
    data.absolute_mirror_env()
    print(f"| corpus | test-split {contamination.NGRAM}-grams | shared | share |")
    print("|---|---:|---:|---:|")
    for corpus in data.CALIB_DATASETS:
        try:
            found = contamination.corpus_overlap(corpus, "wikitext2", args.data_dir)
        except Exception as err:  # a corpus this machine cannot read (hub only, not mirrored)
            print(f"| {corpus} | – | – | unavailable: {str(err).splitlines()[0][:100]} |")
            continue
        print(f"| {corpus} | {found.eval_ngrams:,} | {found.shared:,} | {100 * found.fraction:.3f}% |")
    return 0


def _list() -> int:
    from harness.cli_sweep import group_options
    from harness.data import CALIB_DATASETS, PPL_DATASETS
    from harness.spec import BITS_GRAMMAR, CalibSpec, PerplexitySpec, TrainSpec
    from methods import METHODS
    from methods.act import ACT_QUANTIZERS
    from methods.core.params import described
    from methods.kv import KV_QUANTIZERS

    print("models:     " + ", ".join(group_options("model")) + "  (model=hf model.id=<hub id or path>)")
    print("methods:    " + ", ".join(sorted(METHODS)))
    print("act:        " + ", ".join(sorted(ACT_QUANTIZERS)) + "  (activation quantizers, used when a < 16)")
    print("kv:         " + ", ".join(sorted(KV_QUANTIZERS)) + "  (KV-cache quantizers, used when kv < 16)")
    for group, registry in (("method", METHODS), ("act", ACT_QUANTIZERS), ("kv", KV_QUANTIZERS)):
        for name, entry in sorted(registry.items()):
            print(f"  {group}={name}: " + ", ".join(described(entry.config_cls())))
    for key, spec in (("calib", CalibSpec()), ("eval.ppl", PerplexitySpec()), ("train", TrainSpec())):
        relation = " (seqlen also <= the model's context length)"
        print(f"  {key}: " + ", ".join(described(spec)) + relation)
    print("perplexity: " + ", ".join(PPL_DATASETS))
    print("calib:      " + ", ".join(CALIB_DATASETS))
    print("budgets:    " + ", ".join(group_options("budget")))
    print("bits:       " + BITS_GRAMMAR + "; G <= the narrowest decoder linear's input width")
    print(f"tracking:   {DEFAULT_TRACKING_URI} (env MLFLOW_TRACKING_URI), experiment {DEFAULT_EXPERIMENT}")
    return 0


def _closed_stdout_ends_quietly(entry) -> int:
    """`python -m harness rerun --print | head` closes stdout early: stop there without a traceback (the Python
    docs' SIGPIPE recipe: point stdout at devnull so the interpreter's final flush does not raise again)."""
    try:
        code = entry()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(_closed_stdout_ends_quietly(main))
