"""Config fields whose meaning changed after runs were recorded, so old run keys and old results stay readable.

* `added_later(default, legacy)`: a parameter introduced after runs were recorded; `legacy` is the value those
  runs implicitly had (the old behaviour). The harness leaves the parameter out of the run key while it holds
  its legacy value, so runs recorded before it existed keep their keys and are not redone.
* `changed_default(default, legacy)`: a parameter that existed (and is in old runs' keys) whose default changed.

`legacy_values(config_cls)` gives both kinds' legacy values: what re-creates a run recorded before the change.
"""

from __future__ import annotations

import dataclasses
from typing import Any

LEGACY = "quantbench_legacy"
ADDED = "quantbench_added_later"
ONLY_IF = "quantbench_only_if"


def added_later(default: Any, legacy: Any, only_if: str | None = None) -> Any:
    """`only_if`: the boolean parameter without which this one has no effect (labels then leave it out)."""
    return dataclasses.field(default=default, metadata={LEGACY: legacy, ADDED: True, ONLY_IF: only_if})


def changed_default(default: Any, legacy: Any) -> Any:
    return dataclasses.field(default=default, metadata={LEGACY: legacy, ADDED: False})


def legacy_values(config_cls: type) -> dict[str, Any]:
    """Parameter -> the value runs recorded before it was added (or its default changed) implicitly had."""
    return {f.name: f.metadata[LEGACY] for f in dataclasses.fields(config_cls) if LEGACY in f.metadata}


def key_neutral(config_cls: type) -> dict[str, Any]:
    """Parameters added later -> their legacy value (left out of run keys while they hold it)."""
    return {f.name: f.metadata[LEGACY] for f in dataclasses.fields(config_cls) if f.metadata.get(ADDED, False)}


def inert(config_cls: type, params: dict[str, str]) -> set[str]:
    """Parameters that have no effect in a run with these (logged, as text) params: their `only_if` flag is off."""
    return {
        f.name
        for f in dataclasses.fields(config_cls)
        if f.metadata.get(ONLY_IF) and str(params.get(f.metadata[ONLY_IF])).lower() in ("false", "0", "none", "null")
    }
