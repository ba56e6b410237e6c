"""Structured configs: every method's and plug-in's config dataclass is registered with Hydra's ConfigStore as
`<group>/<name>_schema`, so defaults live once, in code. A YAML in `conf/<group>/` starts from its schema
(`defaults: [<name>_schema, _self_]`) and carries only the paper-section comments and the values that differ.
Hydra then type-checks every override (`method.damp=abc` fails) and knows the valid keys.
"""

from __future__ import annotations

import dataclasses

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from methods import METHODS
from methods.act import ACT_QUANTIZERS
from methods.kv import KV_QUANTIZERS

GROUPS = {"method": METHODS, "act": ACT_QUANTIZERS, "kv": KV_QUANTIZERS}


def schema(name: str, config_cls: type):
    """The dataclass plus a `name` field (the registry key), as a writable structured DictConfig."""
    node_cls = dataclasses.make_dataclass(
        f"{config_cls.__name__}Node", [("name", str, dataclasses.field(default=name))], bases=(config_cls,), frozen=True
    )
    node = OmegaConf.structured(node_cls)
    _writable(node)  # frozen dataclasses give read-only nodes (nested ones too); YAML and overrides must merge
    return node


def _writable(node) -> None:
    OmegaConf.set_readonly(node, False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _writable(child)


def register_configs() -> None:
    store = ConfigStore.instance()
    for group, registry in GROUPS.items():
        for name, entry in registry.items():
            store.store(group=group, name=f"{name}_schema", node=schema(name, entry.config_cls))


register_configs()
