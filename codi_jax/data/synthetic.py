"""Synthetic arithmetic word problems in GSM8k-Aug format, for fast end-to-end runs.

Every step applies one operator and a fresh operand to the previous result, so the answer needs the
whole chain: a small model does much worse without the chain of thought than with it. A problem's
split is a hash of its CoT, so splits are disjoint by construction, whatever the seed or sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Mapping

from codi_jax.config_rules import Enum, Int, Seq
from codi_jax.errors import InputError
from codi_jax.options import option

OPS = ("+", "-", "*", "/")
SPLITS = ("train", "valid", "test")
# Upper bounds of each split's share of the hashed problem space (80/10/10); sizes are per call.
_SPLIT_BOUNDS = (("train", 0.8), ("valid", 0.9), ("test", 1.0))

_PEOPLE = (
  ("Tom", "he", "him", "his"),
  ("Mia", "she", "her", "her"),
  ("Sam", "he", "him", "his"),
  ("Lena", "she", "her", "her"),
  ("Omar", "he", "him", "his"),
  ("Ava", "she", "her", "her"),
  ("Ravi", "he", "him", "his"),
  ("Zoe", "she", "her", "her"),
)
_ITEMS = ("apples", "marbles", "stickers", "cookies", "coins", "pencils", "shells", "stamps")
_CONTAINERS = ("boxes", "bags", "baskets", "jars", "crates", "packs")

# Placeholders: {name} {he} {He} {him} {his} {items} {containers}, {x} the start, {n} the operand.
_OPENINGS = {
  "+": (
    "{name} has {x} {items} and buys {n} more.",
    "{name} starts with {x} {items} and finds {n} more.",
  ),
  "-": (
    "{name} has {x} {items} and gives {n} of them to a friend.",
    "{name} starts with {x} {items} and loses {n} of them.",
  ),
  "*": (
    "{name} has {x} {containers} with {n} {items} in each.",
    "{name} buys {x} {containers} of {items}, with {n} {items} in each.",
  ),
  "/": (
    "{name} has {x} {items} and splits them equally into {n} {containers}, keeping just one.",
    "{name} has {x} {items} and shares them equally among {n} friends, keeping one share.",
  ),
}
_STEPS = {
  "+": (
    "Then {he} gets {n} more {items}.",
    "A friend gives {him} {n} more {items}.",
    "Next, {he} buys {n} more.",
  ),
  "-": (
    "Then {he} gives away {n} {items}.",
    "Next, {he} loses {n} of them.",
    "{He} then sells {n} {items}.",
  ),
  "*": (
    "Then {he} ends up with {n} times as many {items}.",
    "Next, {his} pile of {items} becomes {n} times as big.",
  ),
  "/": (
    "Then {he} splits {his} {items} into {n} equal groups and keeps one group.",
    "Next, {he} divides them equally into {n} {containers} and keeps one.",
  ),
}
_QUESTIONS = (
  "How many {items} does {name} have now?",
  "How many {items} does {name} have at the end?",
)

# style="terse": the same chains in about half the tokens (cheaper steps for CPU-scale runs).
_TERSE_OPENINGS = {
  "+": ("{name} has {x} {items}, gets {n} more.",),
  "-": ("{name} has {x} {items}, loses {n}.",),
  "*": ("{name} has {x} {containers} of {n} {items}.",),
  "/": ("{name} splits {x} {items} into {n} {containers}, keeps one.",),
}
_TERSE_STEPS = {
  "+": ("Gets {n} more.", "Buys {n} more."),
  "-": ("Loses {n}.", "Sells {n}."),
  "*": ("Gets {n} times as many.",),
  "/": ("Keeps one of {n} equal parts.",),
}
_TERSE_QUESTIONS = ("How many now?",)
_STYLES = {
  "story": (_OPENINGS, _STEPS, _QUESTIONS),
  "terse": (_TERSE_OPENINGS, _TERSE_STEPS, _TERSE_QUESTIONS),
}


STYLES = tuple(sorted(_STYLES))


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
  """`config.data.synthetic`: the generated word problems (sizes per split, difficulty, wording)."""

  train: int = option(Int(1, doc="synthetic training problems"))
  valid: int = option(Int(1, doc="synthetic validation problems"))
  test: int = option(Int(1, doc="synthetic test problems"))
  min_steps: int = option(Int(1, doc="fewest operations per problem"))
  max_steps: int = option(Int(1, 64, doc="most operations per problem"))
  min_operand: int = option(Int(1, doc="smallest operand"))
  max_operand: int = option(Int(1, doc="largest operand"))
  max_value: int = option(Int(1, doc="cap on every intermediate value"))
  ops: tuple[str, ...] = option(Seq(Enum(OPS), nonempty=True, doc="operators"))
  style: str = option(Enum(STYLES, doc="wording"))


@dataclasses.dataclass(frozen=True)
class Difficulty:
  """Generator knobs: steps per chain, operand range, cap on every value, operators, wording."""

  min_steps: int = 3
  max_steps: int = 4
  min_operand: int = 2
  max_operand: int = 12
  max_value: int = 999
  ops: tuple[str, ...] = OPS
  style: str = "story"  # "story" | "terse" (shorter questions; the same chains and CoT)

  def validate(self) -> None:
    if not 1 <= self.min_steps <= self.max_steps:
      raise InputError(f"synthetic: need 1 <= min_steps <= max_steps, got {self}")
    if not 1 <= self.min_operand <= self.max_operand <= self.max_value:
      raise InputError(f"synthetic: need 1 <= min_operand <= max_operand <= max_value, got {self}")
    if not self.ops or any(op not in OPS for op in self.ops):
      raise InputError(f"synthetic: ops must be a non-empty subset of {OPS}, got {self.ops}")
    if self.style not in _STYLES:
      raise InputError(f"synthetic: style must be one of {sorted(_STYLES)}, got {self.style!r}")

  @classmethod
  def from_config(cls, cfg: Mapping) -> Difficulty:
    """The difficulty fields of a `config.data.synthetic` mapping (split sizes are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(cfg) - names - set(SPLITS)
    if unknown:
      raise InputError(
        f"config.data.synthetic: unknown keys {sorted(unknown)}; known: {sorted(names)}"
      )
    fields = {k: (tuple(v) if k == "ops" else v) for k, v in cfg.items() if k in names}
    return cls(**fields)


def split_of(cot: str) -> str:
  """The split that owns the problem whose CoT is `cot` (a stable hash; seed-independent)."""
  u = int.from_bytes(hashlib.sha256(cot.encode()).digest()[:8], "big") / 2**64
  return next(name for name, bound in _SPLIT_BOUNDS if u < bound)


def _operand(rng: random.Random, op: str, value: int, d: Difficulty) -> int | None:
  """A random operand for `value op n` keeping every value an integer in [1, max_value]."""
  lo, hi = d.min_operand, d.max_operand
  if op == "+":
    hi = min(hi, d.max_value - value)
  elif op == "-":
    hi = min(hi, value - 1)
  elif op == "*":
    lo, hi = max(lo, 2), min(hi, d.max_value // value)
  else:
    divisors = [n for n in range(max(lo, 2), min(hi, value) + 1) if value % n == 0]
    return rng.choice(divisors) if divisors else None
  return rng.randint(lo, hi) if lo <= hi else None


def _apply(op: str, a: int, b: int) -> int:
  return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def _draw_chain(rng: random.Random, d: Difficulty) -> list[tuple[int, str, int, int]] | None:
  """Steps (a, op, n, result), each starting from the previous result; None if stuck."""
  value = rng.randint(d.min_operand, d.max_operand)
  chain = []
  for _ in range(rng.randint(d.min_steps, d.max_steps)):
    # A random operator; if it has no valid operand, the next ones in turn.
    first = rng.randrange(len(d.ops))
    for k in range(len(d.ops)):
      op = d.ops[(first + k) % len(d.ops)]
      n = _operand(rng, op, value, d)
      if n is not None:
        break
    else:
      return None
    result = _apply(op, value, n)
    chain.append((value, op, n, result))
    value = result
  return chain


def _render(
  rng: random.Random, chain: list[tuple[int, str, int, int]], style: str = "story"
) -> str:
  openings, steps, questions = _STYLES[style]
  name, he, him, his = rng.choice(_PEOPLE)
  words = dict(name=name, he=he, He=he.capitalize(), him=him, his=his)
  words.update(items=rng.choice(_ITEMS), containers=rng.choice(_CONTAINERS))
  x, op, n, _ = chain[0]
  sentences = [rng.choice(openings[op]).format(x=x, n=n, **words)]
  sentences += [rng.choice(steps[op]).format(n=n, **words) for _, op, n, _ in chain[1:]]
  sentences.append(rng.choice(questions).format(**words))
  return " ".join(sentences)


def generate(
  split: str, size: int, *, seed: int = 0, difficulty: Difficulty = Difficulty()
) -> list[dict]:
  """`size` distinct problems of `split`, reproducible from `seed` (a longer run extends a shorter).

  Each is {question, cot, answer, steps, results}: `cot` holds the `<<a*b=c>>` steps joined by
  spaces, `answer` the final value as text, `results` the value after each step (for probing).
  """
  if split not in SPLITS:
    raise InputError(f"synthetic: unknown split {split!r}; expected one of {SPLITS}")
  difficulty.validate()
  rng = random.Random(f"codi-synthetic/{seed}/{split}")
  seen, out = set(), []
  # A split owns >= 10% of the space; past this many draws the space is too small for `size`.
  max_draws = 1000 + 100 * size
  for _ in range(max_draws):
    if len(out) == size:
      break
    chain = _draw_chain(rng, difficulty)
    if chain is None:
      continue
    steps = [f"<<{a}{op}{n}={r}>>" for a, op, n, r in chain]
    cot = " ".join(steps)
    if cot in seen or split_of(cot) != split:
      continue
    seen.add(cot)
    question = _render(rng, chain)  # always drawn, so every style sees the same chains
    if difficulty.style != "story":
      question = _render(random.Random(f"{seed}/{cot}"), chain, difficulty.style)
    out.append(
      dict(
        question=question,
        cot=cot,
        answer=str(chain[-1][3]),
        steps=steps,
        results=[r for *_, r in chain],
      )
    )
  if len(out) < size:
    raise InputError(
      f"synthetic: only {len(out)} distinct {split} problems of {size} found in {max_draws} "
      f"draws; widen the difficulty ({difficulty})"
    )
  return out


def generate_splits(
  sizes: Mapping[str, int], *, seed: int = 0, difficulty: Difficulty = Difficulty()
) -> dict[str, list[dict]]:
  """`generate` for each split named in `sizes`, e.g. {"train": 10000, "valid": 500}."""
  return {split: generate(split, n, seed=seed, difficulty=difficulty) for split, n in sizes.items()}
