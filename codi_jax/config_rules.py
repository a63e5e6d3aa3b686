"""How config rules are declared and checked: `Rule` and its constructors (`Int`, `Num`, `Bool`,
`Str`, `Enum`, `Seq`, `Custom`), cross-field `Cross` rules and their `Context`, and the checks of a
config tree or of flag values against a table of rules.

The rules themselves are declared on the option classes beside their code (`codi_jax.options`;
the training config is `train_options.TrainOptions`) and in config_cross.py (cross-field).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from codi_jax.errors import InputError

# ------------------------------------------------------------------------------------ rules


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one field may hold: a kind (int, num, bool, str, enum, seq, custom) and its bounds."""

  kind: str
  doc: str = ""
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  inf: bool = False  # num: +inf allowed
  f32: bool = False  # num: used on the device, so the bounds hold once rounded to float32
  choices: tuple | Callable[[], tuple] = ()  # enum
  nonempty: bool = False  # str, seq
  optional: bool = False  # None allowed ("not given")
  item: Rule | None = None  # seq: each item's rule
  check: Callable[[Any], bool] | None = None  # custom: True if the value is fine
  allowed_text: str = ""  # custom: what is allowed

  def options(self) -> tuple:
    return self.choices() if callable(self.choices) else tuple(self.choices)

  def allowed(self) -> str:
    """What the field may hold, for people."""
    text = {
      "int": "an integer",
      "num": "a number" if not self.inf else "a number or inf",
      "bool": "True or False",
      "str": "a non-empty string" if self.nonempty else "a string",
    }.get(self.kind)
    if self.kind == "enum":
      text = "one of " + ", ".join(str(c) for c in self.options())
    elif self.kind == "seq":
      what = "a non-empty list" if self.nonempty else "a list"
      text = f"{what} whose items are each {self.item.allowed()}" if self.item else what
    elif self.kind == "custom":
      text = self.allowed_text
    if self.kind in ("int", "num"):
      text += self._range()
    return text + (" (or None)" if self.optional else "")

  def refusal(self, value) -> str:
    """`allowed()`, saying why when only float32 rounding (what the device sees) breaks the rule."""
    text = self.allowed()
    if self.f32 and _is_num(value) and math.isfinite(value) and self._in_range(value):
      text += f" (as float32 the device sees {float(np.float32(value))!r})"
    return text

  def _range(self) -> str:
    lo, hi = _fmt(self.lo), _fmt(self.hi)
    if self.lo is not None and self.hi is not None:
      return f" in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
    if self.lo is not None:
      return f" {'>' if self.lo_open else '>='} {lo}"
    if self.hi is not None:
      return f" {'<' if self.hi_open else '<='} {hi}"
    return ""

  def ok(self, value) -> bool:
    """Whether `value` satisfies the rule."""
    if value is None:
      return self.optional
    if self.kind == "int":
      return is_int(value) and self._in_range(value)
    if self.kind == "num":
      if not _is_num(value) or math.isnan(value):
        return False
      if math.isinf(value) and not (self.inf and value > 0):
        return False
      if self.f32 and math.isfinite(value):
        if abs(value) > _F32_MAX:
          return False
        # As given and as the device sees it: 1 - 1e-10 is 1.0 there, 1e-300 is 0.0.
        return self._in_range(value) and self._in_range(float(np.float32(value)))
      return self._in_range(value)
    if self.kind == "bool":
      return isinstance(value, bool)
    if self.kind == "str":
      return isinstance(value, str) and (bool(value) or not self.nonempty)
    if self.kind == "enum":
      return isinstance(value, str | int | float) and any(
        value == c and type(value) is type(c) for c in self.options()
      )
    if self.kind == "seq":
      if not isinstance(value, list | tuple) or (self.nonempty and not value):
        return False
      return self.item is None or all(self.item.ok(v) for v in value)
    if self.kind == "custom":
      try:
        return bool(self.check(value))
      except (TypeError, ValueError, AttributeError, IndexError, KeyError, OverflowError):
        return False
    raise ValueError(f"unknown rule kind {self.kind!r}")

  def _in_range(self, v) -> bool:
    if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
      return False
    return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))


_F32_MAX = float(np.finfo(np.float32).max)
INT32_MAX = 2**31 - 1  # the largest seed, count or budget a device int32 holds
DROPOUT = {"ge": 0.0, "lt": 1.0}  # Num(**DROPOUT): a dropout rate


def _fmt(x) -> str:
  return "inf" if x == math.inf else f"{x:g}" if isinstance(x, float) else str(x)


def is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def Int(lo=None, hi=None, *, doc="", optional=False) -> Rule:  # noqa: N802  (a rule constructor)
  return Rule("int", doc, lo=lo, hi=hi, optional=optional)


def Num(  # noqa: N802
  *, ge=None, gt=None, le=None, lt=None, inf=False, f32=True, doc="", optional=False
) -> Rule:
  """A real number (not bool), finite unless `inf`; `f32` (default): the bounds hold for the
  float32 the device computes with (host-only knobs pass f32=False)."""
  lo, hi = (gt, ge)[gt is None], (lt, le)[lt is None]
  return Rule(
    "num", doc, lo=lo, hi=hi, lo_open=gt is not None, hi_open=lt is not None, inf=inf, f32=f32,
    optional=optional,
  )  # fmt: skip


def Bool(*, doc="") -> Rule:  # noqa: N802
  return Rule("bool", doc)


def Str(*, doc="", nonempty=False, optional=False) -> Rule:  # noqa: N802
  return Rule("str", doc, nonempty=nonempty, optional=optional)


def Enum(choices, *, doc="", optional=False) -> Rule:  # noqa: N802
  return Rule("enum", doc, choices=choices, optional=optional)


def Seq(item: Rule | None = None, *, doc="", nonempty=False, optional=False) -> Rule:  # noqa: N802
  return Rule("seq", doc, item=item, nonempty=nonempty, optional=optional)


def Custom(check: Callable[[Any], bool], allowed: str, *, doc="", optional=False) -> Rule:  # noqa: N802
  return Rule("custom", doc, check=check, allowed_text=allowed, optional=optional)


# -------------------------------------------------------------------------- cross-field rules


@dataclasses.dataclass(frozen=True)
class Cross:
  """A rule over several fields: `check(config, ctx)` raises through `fail`."""

  name: str
  fields: tuple[str, ...]  # the fields it reads (its error names one of them)
  check: Callable[[Any, Context], None]
  doc: str


@dataclasses.dataclass(frozen=True)
class Context:
  """What a config is checked against: the devices, processes and backend of this job."""

  devices: int = 1
  processes: int = 1
  platform: str = "cpu"  # jax.default_backend()


def fail(path: str, value, allowed: str, prefix: str = "--config."):
  raise InputError(f"{prefix}{path}: got {_show(value)}; expected {allowed}")


def _show(value) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def at_path(config, path: str):
  for part in path.split("."):
    config = config[part]
  return config


# ------------------------------------------------------------------------------ tree checks


def _is_group(value) -> bool:
  import ml_collections  # pylint: disable=import-outside-toplevel

  return isinstance(value, dict | ml_collections.ConfigDict)


def group_paths(rules: Mapping[str, Rule]) -> set[str]:
  """Every group path of `rules` (each proper prefix of a field path)."""
  return {p.rsplit(".", i)[0] for p in rules for i in range(1, p.count(".") + 1)}


def check_tree(
  tree, rules: Mapping[str, Rule], *, prefix: str, complete: bool = True, only=None
) -> None:
  """Unknown keys, missing keys (if `complete`), then every field of `tree` against `rules`.

  only: field-path prefixes whose values are checked (None: all); keys are checked everywhere.
  """
  groups = group_paths(rules)
  seen = set()

  def walk(node, base):
    for key, value in node.items():
      path = f"{base}{key}"
      if path in groups:
        if not _is_group(value):
          fail(path, value, "a group of fields (" + _members(rules, path) + ")", prefix)
        walk(value, path + ".")
      elif path in rules:
        seen.add(path)
        if only is None or any(path == o or path.startswith(o + ".") for o in only):
          rule = rules[path]
          if not rule.ok(value):
            fail(path, value, rule.refusal(value), prefix)
      else:
        raise InputError(f"{prefix}{path}: unknown field{_did_you_mean(path, rules, groups)}")

  walk(tree, "")
  if complete:
    missing = [p for p in rules if p not in seen]
    if missing:
      raise InputError(f"{prefix}{missing[0]}: missing (expected {rules[missing[0]].allowed()})")


def _members(rules, group: str) -> str:
  names = sorted({p[len(group) + 1 :].split(".")[0] for p in rules if p.startswith(group + ".")})
  return ", ".join(names)


def _did_you_mean(path: str, rules, groups) -> str:
  close = difflib.get_close_matches(path, [*rules, *groups], n=1, cutoff=0.75)
  if close:
    return f" (did you mean {close[0]}?)"
  group = path.rpartition(".")[0]
  known = _members(rules, group) if group else ", ".join(sorted({p.split(".")[0] for p in rules}))
  return f"; known here: {known}"


def check_values(values: Mapping[str, Any], rules: Mapping[str, Rule], *, prefix: str) -> None:
  """Each of `values` (flag name or field -> value) against its rule; KeyError for a name
  without one (every field must have a rule)."""
  for name, value in values.items():
    rule = rules[name]
    if not rule.ok(value):
      fail(name, value, rule.refusal(value), prefix)
