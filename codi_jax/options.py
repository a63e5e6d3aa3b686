"""Typed option classes: each field declares its rule (type, range or choices, doc) on the field
itself, in the module whose code reads it, so a setting has one owner and no table restates it.

    @dataclasses.dataclass(frozen=True)
    class OptimOptions:
      lr: float = option(Num(gt=0, doc="peak learning rate"))

    OptimOptions.from_config(config.optim)  # checks every field, then builds the frozen instance

`rules(cls)` flattens a class (and its `section` fields) into field path -> `Rule`, which
`config_rules.check_tree` / `check_values` apply with the one-line error form; `reference` writes
the generated config reference (codi_jax/config_reference.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from codi_jax.config_rules import Rule, check_tree


def option(rule: Rule, default: Any = dataclasses.MISSING):
  """A field holding one setting, checked by `rule`; no default: the config file supplies it
  (defaults must be immutable: the classes are frozen)."""
  return dataclasses.field(default=default, metadata={"rule": rule})


def section(cls: type):
  """A field holding a nested option class (a `config.<name>` group)."""
  return dataclasses.field(metadata={"section": cls})


def rules(cls: type, prefix: str = "") -> dict[str, Rule]:
  """Field path -> rule over `cls` and its sections, in declaration order."""
  out: dict[str, Rule] = {}
  for f in dataclasses.fields(cls):
    if "section" in f.metadata:
      out.update(rules(f.metadata["section"], f"{prefix}{f.name}."))
    elif "rule" in f.metadata:
      out[f"{prefix}{f.name}"] = f.metadata["rule"]
  return out


def build(cls: type, tree: Mapping[str, Any]):
  """`cls` from an already checked config tree (lists become tuples: the instance is frozen)."""
  kwargs = {}
  for f in dataclasses.fields(cls):
    if "section" in f.metadata:
      kwargs[f.name] = build(f.metadata["section"], tree[f.name])
    elif "rule" in f.metadata:
      kwargs[f.name] = _frozen(tree[f.name])
  return cls(**kwargs)


def _frozen(value):
  return tuple(_frozen(v) for v in value) if isinstance(value, list | tuple) else value


def from_config(cls: type, tree: Mapping[str, Any], *, prefix: str = "--config."):
  """Checks `tree` against `cls`'s rules (unknown, missing, types, ranges), then builds `cls`."""
  check_tree(tree, rules(cls), prefix=prefix)
  return build(cls, tree)


def reference(table: Mapping[str, Rule], default: Callable[[str], Any] | None) -> list[str]:
  """Markdown table rows (field, default, allowed, doc) for every rule of `table`; `default(path)`
  gives a field's default (None: the column stays empty)."""
  rows = []
  for path, rule in table.items():
    shown = "" if default is None else f"`{_frozen(default(path))!r}`"
    cells = (f"`{path}`", shown, rule.allowed(), rule.doc)
    rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  return rows
