"""Config fields whose meaning changed after runs were recorded, so old run keys and old results stay readable.

* `added_later(default, legacy)`: a parameter introduced after runs were recorded; `legacy` is the value those
  runs implicitly had (the old behaviour). The harness leaves the parameter out of the run key while it holds
  its legacy value, so runs recorded before it existed keep their keys and are not redone.
* `changed_default(default, legacy)`: a parameter that existed (and is in old runs' keys) whose default changed.

`legacy_values(config_cls)` gives both kinds' legacy values: what re-creates a run recorded before the change.

Every numeric or enumerated field also declares its valid values next to its default (`valid(default, ge=0)`,
`valid("had", choices=VARIANTS)`, or `added_later(..., valid=Valid(...))`); `violations(config)` checks a built
config against them all (nested settings blocks too), so a bad value is refused at planning, before any model
loads, with every violation in one message (issue 48).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

LEGACY = "quantbench_legacy"
ADDED = "quantbench_added_later"
ONLY_IF = "quantbench_only_if"
VALID = "quantbench_valid"


@dataclasses.dataclass(frozen=True)
class Valid:
    """A field's valid values: bounds (`ge`/`gt`/`le`/`lt`, numbers), `choices` (any values), `none` (None also
    valid: an optional setting). Booleans are checked as booleans, numbers must not be booleans."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    none: bool = False

    def describe(self) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        else:
            bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            parts = [f"{op} {bound:g}" for op, bound in bounds if bound is not None]
            text = " and ".join(parts) if parts else "any number"
        return text + (" or null" if self.none else "")

    def admits(self, value: Any) -> bool:
        if value is None:
            return self.none
        if self.choices is not None:  # True is not 1: a boolean matches only a boolean choice
            return any(isinstance(value, bool) == isinstance(c, bool) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )


def valid(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **rule: Any) -> Any:
    """A dataclass field with its valid values (`Valid`'s keywords)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={VALID: Valid(**rule)})


def flag(default: bool) -> Any:
    """A boolean field."""
    return valid(default, choices=(False, True))


def added_later(default: Any, legacy: Any, only_if: str | None = None, valid: Valid | None = None) -> Any:
    """`only_if`: the boolean parameter without which this one has no effect (labels then leave it out)."""
    metadata = {LEGACY: legacy, ADDED: True, ONLY_IF: only_if, **({VALID: valid} if valid else {})}
    return dataclasses.field(default=default, metadata=metadata)


def changed_default(default: Any, legacy: Any, valid: Valid | None = None) -> Any:
    return dataclasses.field(
        default=default, metadata={LEGACY: legacy, ADDED: False, **({VALID: valid} if valid else {})}
    )


def rule_of(field: dataclasses.Field) -> Valid | None:
    return field.metadata.get(VALID)


def leaves(config: Any, prefix: str = "") -> Iterator[tuple[str, Any, Valid | None]]:
    """(dotted name, value, rule) of every leaf of the dataclass instance `config`, nested blocks flattened."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from leaves(value, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", value, rule_of(field)


def violations(config: Any, prefix: str = "") -> list[str]:
    """`name=value (must be ...)` for every leaf of the dataclass instance `config` whose value its declared rule
    does not admit."""
    return [
        f"{name}={value!r} (must be {rule.describe()})"
        for name, value, rule in leaves(config, prefix)
        if rule is not None and not rule.admits(value)
    ]


def with_choice_spelling(config_cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """`params` with a boolean-looking value of a text-choice field spelled as its choice: Hydra reads
    `method.duo_scaling=false` as a boolean and a typed str node keeps it as "False", which a choice of
    ("true", "false", "both") must still match. Nested settings blocks too; other values are left as they are."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    spelled = dict(params)
    for name, value in params.items():
        field = fields.get(name)
        if field is None:
            continue
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            spelled[name] = with_choice_spelling(type(default), value)
            continue
        rule = rule_of(field)
        if rule is None or not rule.choices or not all(isinstance(c, str) for c in rule.choices):
            continue
        text = str(value).lower() if isinstance(value, bool | str) else None
        if text in ("true", "false") and text in rule.choices:
            spelled[name] = text
    return spelled


def undeclared(config_cls: type, prefix: str = "") -> list[str]:
    """The numeric, boolean or text fields of `config_cls` (and its nested settings blocks) without a rule."""
    missing = []
    for field in dataclasses.fields(config_cls):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if dataclasses.is_dataclass(default):
            missing += undeclared(type(default), f"{prefix}{field.name}.")
        elif rule_of(field) is None and not isinstance(default, tuple | list | dict):
            missing.append(f"{prefix}{field.name}")
    return missing


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


def described(config: Any) -> list[str]:
    """`name=default [rule]` for every leaf of the dataclass instance `config`, as `python -m harness list` shows
    them."""
    return [
        f"{name}={'null' if value is None else value}" + (f" [{rule.describe()}]" if rule else "")
        for name, value, rule in leaves(config)
    ]
