"""The K-by-K multiplication task of iCoT (Deng et al.: implicit CoT, stepwise internalization).

A line is `question||cot #### answer`. Every number is written one digit per token, separated by
single spaces, least significant digit first, and zero-padded at its high end to a fixed width:

- question: `a * b`, both operands K digits (the released files never have a leading zero, i.e.
  the last digit written is nonzero; the generator draws the same way).
- cot: for each digit b_i of b, i = 0..K-1 (least significant first), the partial product
  a * b_i * 10^i written in K+1+i digits, so it starts with i zeros (the shift) and an all-zero
  partial product when b_i = 0. After partial product i for 0 < i < K-1 (K-2 of them; none
  after the first or the last) comes the running sum of partial products 0..i, also K+1+i
  digits wide (it always fits), in parentheses: `( s0 s1 .. )`. These K steps are joined by ` + `.
- answer: the product a * b in 2K digits (a trailing 0 when it has 2K-1 digits).

Worked example, 2365 * 4347 (K = 4): the partial products are 2365*7 = 16555, 2365*4*10 = 94600,
2365*3*100 = 709500 and 2365*4*1000 = 9460000; the running sums are 111155 and 820655:

  5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + 0 0 5 9 0 7 0 ( 5 5 6 0 2 8 0 )
  + 0 0 0 0 6 4 9 0 #### 5 5 6 0 8 2 0 1

(one line in the files; wrapped here). Training pairs must be disjoint from the valid/test pairs.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
from collections.abc import Collection, Iterable

from codi_jax.config_rules import Int
from codi_jax.errors import InputError
from codi_jax.options import option

SIZES = (4, 5, 7, 9)  # the operand sizes K of the released iCoT sets
_COT_SEP = "||"
_ANSWER_SEP = " #### "


@dataclasses.dataclass(frozen=True)
class MultiplicationOptions:
  """`config.data.multiplication`: the generated K x K multiplication sets."""

  digits: int = option(Int(1, 64, doc="operand digits"))
  train: int = option(Int(1, doc="training pairs"))
  valid: int = option(Int(1, doc="validation pairs"))
  test: int = option(Int(1, doc="test pairs"))


def _digits(n: int, width: int) -> str:
  """`n` as `width` space-separated digits, least significant first, zero-padded."""
  s = str(n)[::-1]
  if n < 0 or len(s) > width:
    raise InputError(f"multiplication: {n} does not fit in {width} digits")
  return " ".join(s.ljust(width, "0"))


def _value(text: str, where: str) -> int:
  """The number spelled by space-separated digits, least significant first."""
  tokens = text.split(" ")
  if not tokens or not all(len(t) == 1 and t.isdigit() for t in tokens):
    raise InputError(f"{where}: expected space-separated digits, got {text!r}")
  return int("".join(reversed(tokens)))


def format_question(a: int, b: int, digits: int) -> str:
  """`a0 a1 .. * b0 b1 ..`: both operands in `digits` digits, least significant first."""
  return f"{_digits(a, digits)} * {_digits(b, digits)}"


def format_cot(a: int, b: int, digits: int) -> str:
  """The partial products of a * b, shifted and padded, with the running sums between them."""
  parts, total = [], 0
  for i, d in enumerate(str(b)[::-1].ljust(digits, "0")):
    partial = a * int(d) * 10**i
    total += partial
    width = digits + 1 + i
    parts.append(("+ " if i else "") + _digits(partial, width))
    if 0 < i < digits - 1:
      parts.append(f"( {_digits(total, width)} )")
  return " ".join(parts)


def format_answer(a: int, b: int, digits: int) -> str:
  """The product a * b in 2 * `digits` digits, least significant first."""
  return _digits(a * b, 2 * digits)


def format_line(a: int, b: int, digits: int) -> str:
  """The iCoT line `question||cot #### answer` of a * b for `digits`-digit operands."""
  if digits < 1:
    raise InputError(f"multiplication: digits must be >= 1, got {digits}")
  if not (0 <= a < 10**digits and 0 <= b < 10**digits):
    raise InputError(f"multiplication: operands {a}, {b} must have at most {digits} digits")
  question = format_question(a, b, digits)
  return f"{question}{_COT_SEP}{format_cot(a, b, digits)}{_ANSWER_SEP}{format_answer(a, b, digits)}"


def split_line(line: str, where: str = "line") -> tuple[str, str, str]:
  """(question, cot, answer) of an iCoT line; trailing whitespace is ignored."""
  line = line.rstrip()
  question, sep, rest = line.partition(_COT_SEP)
  cot, sep2, answer = rest.rpartition(_ANSWER_SEP)
  if not sep or not sep2:
    raise InputError(f"{where}: expected 'question||cot #### answer', got {line[:80]!r}")
  return question, cot, answer


def _operands(question: str, where: str) -> tuple[int, int, int]:
  """(a, b, digits) of a question `a0 a1 .. * b0 b1 ..`."""
  sides = question.split(" * ")
  if len(sides) != 2:
    raise InputError(f"{where}: expected 'a0 a1 .. * b0 b1 ..', got {question!r}")
  k = len(sides[0].split(" "))
  if len(sides[1].split(" ")) != k:
    raise InputError(f"{where}: operands of different lengths in {question!r}")
  return _value(sides[0], where), _value(sides[1], where), k


def parse_line(line: str, where: str = "line") -> tuple[int, int]:
  """The operands (a, b) of an iCoT line (or of its question alone)."""
  question = split_line(line, where)[0] if _COT_SEP in line else line.strip()
  a, b, _ = _operands(question, where)
  return a, b


def read_lines(path: str | os.PathLike) -> list[str]:
  """The non-blank lines of an iCoT multiplication file (e.g. K_by_K/valid.txt)."""
  try:
    with open(path, encoding="utf-8") as f:
      return [line.rstrip() for line in f if line.strip()]
  except FileNotFoundError:
    raise InputError(f"{os.fspath(path)}: no such file") from None
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{os.fspath(path)}: cannot read ({e})") from None


def generate(
  n: int, digits: int, seed: int = 0, *, exclude: Collection[tuple[int, int]] = ()
) -> list[str]:
  """`n` distinct lines of uniformly random `digits`-digit pairs (a, b) not in `exclude`.

  Leading digits are nonzero, as in the released files. Reproducible from `seed`, and a longer
  run extends a shorter one; `exclude` (e.g. the valid/test pairs) only drops pairs from it.
  """
  if digits < 1:
    raise InputError(f"multiplication: digits must be >= 1, got {digits}")
  if n < 0:
    raise InputError(f"multiplication: n must be >= 0, got {n}")
  lo, hi = 10 ** (digits - 1), 10**digits
  excluded = {(a, b) for a, b in exclude if lo <= a < hi and lo <= b < hi}
  available = (hi - lo) ** 2 - len(excluded)
  if n > available:
    raise InputError(
      f"multiplication: only {available} distinct {digits}x{digits} pairs outside `exclude`, "
      f"{n} asked"
    )
  rng = random.Random(f"codi-multiplication/{digits}/{seed}")
  seen, out = set(), []
  while len(out) < n:
    pair = (rng.randrange(lo, hi), rng.randrange(lo, hi))
    if pair in seen or pair in excluded:
      continue
    seen.add(pair)
    out.append(format_line(*pair, digits))
  return out


def records(lines: Iterable[str], source: str = "lines") -> list[dict]:
  """Training records {question, cot, answer, steps, results} of iCoT lines, checked exactly.

  `question` is `a0 .. * b0 ..`, `cot` the partial products and running sums, `answer` the
  product's digits (all as in the line); `steps` are the cot's ` + `-separated parts and `results`
  the running sum after each partial product (ints; the last is the product), for probing.
  A line that is not exactly `format_line` of its operands raises InputError.
  """
  out = []
  for i, line in enumerate(lines, 1):
    where = f"{source}: line {i}"
    question, cot, answer = split_line(line, where)
    a, b, k = _operands(question, where)
    if line.rstrip() != format_line(a, b, k):
      raise InputError(f"{where}: not the iCoT line of {a} * {b} ({k} digits)")
    partials = [a * int(d) * 10**j for j, d in enumerate(str(b)[::-1].ljust(k, "0"))]
    running = list(itertools.accumulate(partials))
    out.append(
      dict(question=question, cot=cot, answer=answer, steps=cot.split(" + "), results=running)
    )
  return out
