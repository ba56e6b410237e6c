"""The Hydra application: one job = one configuration. `python -m harness run|sweep` validates everything first,
then starts this module (`python -m harness.hydra_app [--multirun] overrides...`), so any Hydra launcher
(basic, joblib, submitit, ray) runs jobs the same way; each job's outcome is what it records in MLflow."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import harness.configs  # noqa: F401  (registers the structured configs before Hydra composes)
from harness.runner import execute, spec_from_config
from harness.tracking import Tracker, is_unreachable

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def job(cfg: DictConfig) -> str:
    spec = spec_from_config(cfg)
    try:
        outcome = execute(spec, cfg, Tracker(cfg.tracking_uri, cfg.experiment), force=bool(cfg.force))
    except Exception as err:  # the store went down before this job could claim its key: nothing was computed
        if not is_unreachable(err):
            raise
        print(f"[quantbench]      failed  {spec.run_key}  tracking store {cfg.tracking_uri} unreachable", flush=True)
        return "failed"
    print(f"[quantbench] {outcome.status:>11}  {outcome.run_name}  {outcome.detail}", flush=True)
    return outcome.status


if __name__ == "__main__":
    job()
