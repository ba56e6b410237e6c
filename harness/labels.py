"""How a run is named on the leaderboard: the method plus every parameter that differs from its registered default,
and the act/KV plug-ins in use with theirs (so two variants of one method never share a row label)."""

from __future__ import annotations

from harness.spec import BitSpec


def method_label(method: str, params: dict[str, str]) -> str:
    """The method name plus every parameter that differs from its registered default (e.g. quarot weights=rtn)."""
    changed = changed_params(method, params)
    return f"{method} ({', '.join(changed)})" if changed else method


def changed_params(method: str, params: dict[str, str], reference: dict[str, str] | None = None) -> list[str]:
    """`name=value` for every logged parameter that differs from `reference` (flattened names, values as text;
    default: the method's registered defaults). A parameter the run lacks because it was added later counts at
    its legacy value; one with no effect in this run (`only_if` off) is skipped."""
    from methods import METHODS
    from methods.core.params import inert, key_neutral

    entry = METHODS.get(method)
    if entry is None:
        return []
    # A record that logged its parameters but lacks a later-added one ran with its legacy value (methods.core.params).
    if params:
        params = {**{k: "null" if v is None else str(v) for k, v in key_neutral(entry.config_cls).items()}, **params}
    skip = inert(entry.config_cls, params)
    if reference is None:
        reference = {
            name: "null" if default is None else str(default) for name, default in _flat_defaults(entry.config_cls())
        }
    return [
        f"{name}={params[name]}"
        for name, expected in reference.items()
        if name in params and name not in skip and params[name] != expected
    ]


def _flat_defaults(config, prefix: str = ""):
    """(dotted name, default) of every leaf of a config dataclass, as the flattened run params name them."""
    import dataclasses

    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            yield from _flat_defaults(value, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", value


def row_label(rec: dict) -> str:
    """The method label plus the act/KV plug-ins in use when they are not the default `rtn`
    (e.g. `gptq + kv=kvquant`); records from before the plug-ins carry none."""
    bits = BitSpec.parse(rec["bits"])
    plugins = [
        _plugin_label(group, rec[group])
        for group, used in (("act", bits.quantizes_activations), ("kv", bits.quantizes_kv))
        if used and rec.get(group, {}).get("name", "rtn") != "rtn"
    ]
    return " + ".join([method_label(rec["method"], rec["method_params"]), *plugins])


def _plugin_label(group: str, logged: dict[str, str]) -> str:
    """`kv=kvquant`, plus every plug-in parameter that differs from its registered default
    (`kv=kvquant (datatype=int, sink_tokens=0)`)."""
    from methods.act import ACT_QUANTIZERS
    from methods.kv import KV_QUANTIZERS

    name = logged["name"]
    entry = {"act": ACT_QUANTIZERS, "kv": KV_QUANTIZERS}[group].get(name)
    if entry is None:
        return f"{group}={name}"
    changed = [
        f"{key}={logged[key]}"
        for key, default in _flat_defaults(entry.config_cls())
        if key in logged and logged[key] != ("null" if default is None else str(default))
    ]
    return f"{group}={name}" + (f" ({', '.join(changed)})" if changed else "")
