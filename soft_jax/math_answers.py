r"""Math answer checking for the soft-thinking evaluation (docs/soft_thinking.md 9.3).

(Over 400 lines: the two judges, their normalisation and the timeout guard are one checker.)

Two rules decide whether a completion answers a problem:

- **math_verify** (the reference's judge): the gold is parsed as LaTeX/expression (wrapped in
  `\boxed{}` unless it already holds one); the prediction is parsed from the **whole completion**
  (thinking trace + answer) with LaTeX extraction that tries `\boxed` first (`boxed="all"`, basic
  LaTeX and unit normalisation; no anchorless LaTeX), then plain expressions, in
  `extraction_mode="first_match"`; then `math_verify.verify(gold, prediction)`. The exact
  normalisation flags of the reference are our reading of the spec (inference).
- **numeric**: pure Python, no sympy. When the gold is a plain number (`72`, `#### 1,234`,
  `$5.00`, `3/4`, `\frac{3}{4}`, `12\%`), the prediction's final number is read with the same
  precedence as the reference — the last `\boxed{}` group first, then a `#### N` line, then the
  rightmost "answer ..." phrase, then the last number — and compared with math_verify's numeric
  rule: exact for integers and fractions, rounded to 6 decimals when either side has a decimal
  point, `9%` equal to `9`.

Judges (`check_answer(judge=...)`, `--judge` of `soft_jax.evaluate`):

- `math_verify` (the default): the reference's rule alone.
- `numeric`: the numeric rule alone; a completion it cannot read is wrong, and a gold that is not a
  plain number is an error.
- `numeric_then_math_verify`: the numeric rule whenever it finds a plain number on both sides,
  math_verify otherwise; anything unusual (several different boxed answers, a boxed expression,
  LaTeX near the answer, a trailing arithmetic expression, an unclosed box) goes to math_verify, so
  the numeric rule never guesses.

The numeric rule and math_verify read some completions differently (tested in
tests/soft_math_answers_test.py), which is why math_verify alone is the default:

- "The answer is 19. Let me double check: 19 - 7 = 12.": the numeric rule reads 19 (the number
  after "answer"), math_verify reads 12;
- the numeric rule reads `\$5.00`, a Unicode minus (`−7`) and `1\,234` (thin-space thousands);
  math_verify finds no answer, no answer and 235;
- it takes `#### N` as an answer line (GSM8K style); math_verify takes the last number after it;
- it ignores the reference's rarely-hit "final answer is ... I hope" priority.

Timeouts: math_verify bounds each parse/compare with `signal.alarm`, which raises ValueError
outside the main thread and cancels any alarm the caller had set. We turn its timeouts off and
bound the whole check with one interval timer of our own (`timeout_s`, fractional seconds); a check
that runs out is wrong with note "timeout". Outside the main thread no signal timer can be set, so
the check runs unbounded there (judge in the main thread, or in worker processes, to keep it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
import signal
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Any, NamedTuple

# The default first: the reference's rule alone.
JUDGES = ("math_verify", "numeric", "numeric_then_math_verify")
DEFAULT_JUDGE = "math_verify"

# Notes on a Verdict: why it is what it is, when that is not just a comparison.
NO_ANSWER = "no_answer"  # Nothing answer-like in the completion.
TIMEOUT = "timeout"  # math_verify ran past timeout_s.
GOLD_UNPARSED = "gold_unparsed"  # math_verify could not read the gold.


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The judgement of one completion.

  Attributes:
    correct: Whether the completion's answer equals the gold.
    prediction: The answer read from the completion, as text; None when none was found.
    judge: The rule that decided: "numeric" or "math_verify".
    note: "" or one of NO_ANSWER, TIMEOUT, GOLD_UNPARSED.
  """

  correct: bool
  prediction: str | None
  judge: str
  note: str = ""


class Number(NamedTuple):
  """A plain number as written: `value` before any percent scaling.

  Attributes:
    value: The number (for `12%`, 12).
    exact: False when written with a decimal point (compared after rounding, like a sympy Float).
    percent: Whether it carried a percent sign.
  """

  value: Fraction
  exact: bool
  percent: bool = False


# ---------------------------------------------------------------------------------------------
# Gold answers


def gold_text(answer: Any) -> str:
  """The gold answer as text: GSM8K's `... #### 72` becomes `72`; numbers become their digits.

  Raises:
    ValueError: for a bool or None answer, or an empty one.
  """
  if answer is None or isinstance(answer, bool):
    raise ValueError(f"gold answer must be text or a number, got {answer!r}")
  if isinstance(answer, float) and answer.is_integer():
    answer = int(answer)
  text = str(answer)
  if "####" in text:
    text = text.rsplit("####", 1)[1]
  text = text.strip()
  if not text:
    raise ValueError(f"gold answer is empty: {answer!r}")
  return text


# ---------------------------------------------------------------------------------------------
# Plain numbers

_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_PLAIN = re.compile(
  rf"(?P<sign>[-+]?)\s*[$€£¥]?\s*(?P<num>{_DIGITS})"
  rf"(?:\s*/\s*(?P<den>{_DIGITS}))?"
  r"\s*(?P<pct>%|percent\b)?"
  r"(?P<unit>(?:\s+[A-Za-z]{2,}\.?)*)",
  re.IGNORECASE,
)
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?[\d.,]+)\s*\}\s*\{\s*([-+]?[\d.,]+)\s*\}")
_DROP = re.compile(r"\\[,!;: ]|\\left|\\right|\^\s*\{?\\circ\}?|\\circ|\\degree|~")
# Words that make "5 <word>" more than a number with a unit.
_NOT_UNITS = frozenset({"and", "or", "pi", "sqrt", "times", "cdot", "plus", "minus"})


def _ascii_latex_light(text: str) -> str:
  """`text` with simple LaTeX number dressing undone: \\text{} unwrapped, \\frac{a}{b} as a/b."""
  text = text.replace("\u2212", "-").replace("\\$", "$").replace("{,}", ",").replace("\\%", "%")
  text = _TEXT_CMD.sub(r" \1 ", text)
  text = _FRAC.sub(r"(\1)/(\2)", text)
  text = re.sub(r"\(([-+]?[\d.,]+)\)/\(([-+]?[\d.,]+)\)", r"\1/\2", text)
  return _DROP.sub("", text)


def _to_fraction(digits: str) -> Fraction:
  return Fraction(digits.replace(",", ""))


def parse_number(text: str) -> Number | None:
  r"""`text` as one plain number, or None if it is anything more.

  Reads signs, thousands commas, decimals, `a/b`, `\frac{a}{b}`, a leading currency sign, a
  trailing percent and trailing unit words (`5 \text{ apples}`). Units of one letter, mixed
  numbers (`3 \frac{1}{2}`), variables and lists are not plain numbers.
  """
  text = _ascii_latex_light(text).strip().rstrip(".").strip()
  if "\\" in text:
    return None
  match = _PLAIN.fullmatch(text)
  if match is None:
    return None
  units = match.group("unit").lower().replace(".", " ").split()
  if _NOT_UNITS.intersection(units):
    return None
  value = _to_fraction(match.group("num"))
  exact = "." not in match.group("num")
  if match.group("den") is not None:
    den = _to_fraction(match.group("den"))
    if den == 0:
      return None
    value /= den
    exact = exact and "." not in match.group("den")
  if match.group("sign") == "-":
    value = -value
  return Number(value, exact, match.group("pct") is not None)


def numbers_equal(gold: Number, pred: Number) -> bool:
  """math_verify's rule for two numbers: rounded to 6 decimals if either has a decimal point.

  Two integers compare as written, so `9%` equals `9` (as in math_verify); otherwise a percent
  counts as its value / 100.
  """

  def scaled(n: Number) -> Fraction:
    return n.value / 100 if n.percent else n.value

  if not (gold.exact and pred.exact):
    return round(scaled(gold), 6) == round(scaled(pred), 6)
  if gold.value.denominator == 1 and pred.value.denominator == 1:
    return gold.value == pred.value
  return scaled(gold) == scaled(pred)


# ---------------------------------------------------------------------------------------------
# Reading the prediction's number

_BOX = re.compile(r"\\(?:boxed|fbox)")
_TOKEN = re.compile(
  rf"(?<![\w.,])(?P<tok>-?[$€£¥]?\s?{_DIGITS}(?:\s*/\s*\d+(?![.\d]))?(?:\s*(?:%|percent\b))?)",
  re.IGNORECASE,
)
_HASHES = re.compile(r"####\s*(?P<tok>-?\s?[$€£¥]?\s?[\d.,/]+%?)")
_ANSWER = re.compile(r"\banswer\b", re.IGNORECASE)
_OPERATORS = set("+-*/×÷^=")


class _Defer(Exception):
  """The numeric rule cannot read this completion safely: math_verify decides."""


def boxed_answers(text: str) -> list[str] | None:
  r"""Contents of the final group of `\boxed{}` (or `\fbox{}`) in `text`, in order.

  Follows math_verify's reading (latex2sympy2's `extract_boxed_content`): the last box counts,
  with the boxes before it that are close (under 10 characters apart, or under 70 with "and",
  "or", "," or ";" between and a different content), which math_verify reads as a set of answers.
  A box inside a box is read from the inner one. Returns [] when there is no box and None when the
  last box is not closed.
  """
  results: list[str] = []
  end = len(text)
  next_start = None
  for match in reversed(list(_BOX.finditer(text))):
    if match.end() > end:  # Inside a box already read.
      continue
    brace = match.end()
    while brace < end and text[brace].isspace():
      brace += 1
    if brace >= end or text[brace] != "{":
      return results or None
    depth, close = 0, None
    for i in range(brace, end):
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      if depth == 0:
        close = i
        break
    if close is None:
      return results or None
    content = text[brace + 1 : close].strip()
    if next_start is not None:
      between = text[close + 1 : next_start]
      separated = re.search(r"\b(?:and|or)\b|,|;", between) is not None
      near = len(between) < 10 or (content != results[-1] and len(between) < 70 and separated)
      if not near:
        break
    if not results or results[-1] != content:
      results.append(content)
    next_start, end = match.start(), match.start()
  return results[::-1]


def _token_number(text: str, match: re.Match) -> Number:
  """The number of token `match` in `text`; _Defer if it is part of an expression or LaTeX."""
  start, stop = match.span("tok")
  before = text[:start].rstrip()[-1:]
  after = text[stop:].lstrip()[:1]
  if before in ("{", "\\", "_", "^") or after in ("{", "}", "^", "_"):
    raise _Defer
  if (before and before in _OPERATORS and before != "=") or (after and after in _OPERATORS):
    raise _Defer  # Part of an arithmetic expression: math_verify evaluates those.
  if match.group("tok").startswith("-") and (before.isdigit() or before == ")"):
    raise _Defer  # "12 -3" is a subtraction.
  number = parse_number(match.group("tok"))
  if number is None:
    raise _Defer
  return number


def _answer_phrase_number(text: str) -> tuple[str, Number] | None:
  """The number after the rightmost "answer" (same line, within 100 characters) that has one."""
  for anchor in reversed(list(_ANSWER.finditer(text))):
    tail = text[anchor.end() : anchor.end() + 100].split("\n", 1)[0]
    for match in _TOKEN.finditer(tail):
      if "\\" in tail[: match.end()]:
        raise _Defer  # LaTeX answer ("the answer is $\frac{1}{2}$"): math_verify reads it.
      after = tail[match.end() :].lstrip()[:1]
      if after and after in _OPERATORS:
        continue  # "answer is 7 + 5 = 12": the number after the last operator.
      return match.group("tok").strip(), _token_number(tail, match)
  return None


def _read_number(completion: str) -> tuple[str, Number] | None:
  r"""The completion's final answer as (text, number), or None when it has no number.

  Precedence: the last `\boxed{}` group (a single answer), a `#### N` line, the number after the
  rightmost "answer", the last number in the text.

  Raises:
    _Defer: when only math_verify can read it (a boxed expression, several boxed answers, LaTeX
      at the answer, a trailing arithmetic expression).
  """
  text = _ascii_latex_light(completion)
  boxed = boxed_answers(completion)
  if boxed is None or (boxed and (len(set(boxed)) != 1 or not boxed[0])):
    raise _Defer
  if boxed:
    number = parse_number(boxed[0])
    if number is None:
      raise _Defer
    return boxed[0], number
  hashes = list(_HASHES.finditer(text))
  if hashes:
    number = parse_number(hashes[-1].group("tok"))
    if number is None:
      raise _Defer
    return hashes[-1].group("tok").strip(), number
  found = _answer_phrase_number(text)
  if found is not None:
    return found
  tokens = list(_TOKEN.finditer(text))
  if not tokens:
    return None
  return tokens[-1].group("tok").strip(), _token_number(text, tokens[-1])


# ---------------------------------------------------------------------------------------------
# math_verify


class _Timeout(BaseException):
  """Our own alarm: a BaseException, so math_verify's `except Exception` lets it through."""


class _QuietTimeoutWarning(logging.Filter):
  """Drops math_verify's "Timeout is disabled" warning: we set our own timer instead."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Timeout is disabled")


@functools.cache
def _math_verify():
  """math_verify (imported on first use: it loads sympy) and the reference's configurations."""
  import math_verify  # pylint: disable=import-outside-toplevel
  from latex2sympy2_extended import NormalizationConfig  # pylint: disable=import-outside-toplevel

  for name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(name).addFilter(_QuietTimeoutWarning())
  gold_config = (math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig())
  pred_config = (
    math_verify.LatexExtractionConfig(
      normalization_config=NormalizationConfig(
        basic_latex=True, units=True, malformed_operators=False, nits=False, boxed="all"
      ),
      boxed_match_priority=0,
      try_extract_without_anchor=False,
    ),
    math_verify.ExprExtractionConfig(),
  )
  return math_verify, gold_config, pred_config


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
  """Raises _Timeout in the block after `seconds` (main thread only; elsewhere no limit).

  A timer the caller had running is held off during the block and re-armed after it with what it
  had left (at least 1 ms).
  """
  if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
    yield
    return

  def on_alarm(signum, frame):
    del signum, frame
    raise _Timeout

  start = time.monotonic()
  old_handler = signal.signal(signal.SIGALRM, on_alarm)
  old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    try:
      signal.setitimer(signal.ITIMER_REAL, 0)
    finally:  # Even if the alarm went off right at the end: the timer is one-shot.
      signal.signal(signal.SIGALRM, old_handler)
      if old_delay > 0:
        left = max(old_delay - (time.monotonic() - start), 1e-3)
        signal.setitimer(signal.ITIMER_REAL, left, old_interval)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
  mv, gold_config, _ = _math_verify()
  text = gold if "\\boxed" in gold else f"\\boxed{{{gold}}}"
  return tuple(mv.parse(text, gold_config, extraction_mode="first_match", parsing_timeout=None))


def _parse_prediction(completion: str) -> list:
  mv, _, pred_config = _math_verify()
  return mv.parse(completion, pred_config, extraction_mode="first_match", parsing_timeout=None)


def _verify(gold: list, pred: list) -> bool:
  mv, _, _ = _math_verify()
  return bool(mv.verify(gold, pred, timeout_seconds=None))


def _as_text(parsed: list) -> str | None:
  """The extracted answer's text: math_verify lists (expression, text) or (text,) on fallback."""
  if not parsed:
    return None
  return str(parsed[-1]) if isinstance(parsed[-1], str) else str(parsed[0])


def math_verify_check(completion: str, gold: str, *, timeout_s: float | None = 5.0) -> Verdict:
  """The reference's rule judge (math_verify) on the whole completion; see the module doc."""
  gold = gold_text(gold)
  try:
    with _time_limit(timeout_s):
      gold_parsed = list(_parse_gold(gold))
      pred = _parse_prediction(completion)
      if not gold_parsed:
        return Verdict(False, _as_text(pred), "math_verify", GOLD_UNPARSED)
      if not pred:
        return Verdict(False, None, "math_verify", NO_ANSWER)
      return Verdict(_verify(gold_parsed, pred), _as_text(pred), "math_verify")
  except _Timeout:
    return Verdict(False, None, "math_verify", TIMEOUT)


# ---------------------------------------------------------------------------------------------
# The judge


def check_answer(
  completion: str, gold: Any, *, judge: str = DEFAULT_JUDGE, timeout_s: float | None = 5.0
) -> Verdict:
  r"""Whether `completion` (thinking trace + answer, whole) answers `gold`.

  Args:
    completion: The decoded completion.
    gold: The gold answer (text or number; GSM8K's `... #### 72` is read as 72).
    judge: "math_verify" (the reference's rule, the default), "numeric" (numeric rule only: a
      completion it cannot read is wrong) or "numeric_then_math_verify" (numeric rule when both
      sides are plain numbers, else math_verify).
    timeout_s: Bound on one math_verify check, in seconds; None for none.

  Returns:
    The Verdict.

  Raises:
    ValueError: for an unknown judge, an empty gold, or a non-numeric gold with judge="numeric".
  """
  if judge not in JUDGES:
    raise ValueError(f"unknown judge {judge!r}; expected one of {JUDGES}")
  gold = gold_text(gold)
  if judge == "math_verify":
    return math_verify_check(completion, gold, timeout_s=timeout_s)
  gold_number = parse_number(gold)
  if gold_number is None:
    if judge == "numeric":
      raise ValueError(f"judge 'numeric' needs a plain-number gold, got {gold!r}")
    return math_verify_check(completion, gold, timeout_s=timeout_s)
  try:
    found = _read_number(completion)
  except _Defer:
    if judge == "numeric":
      return Verdict(False, None, "numeric", NO_ANSWER)
    return math_verify_check(completion, gold, timeout_s=timeout_s)
  if found is None:
    if judge == "numeric":
      return Verdict(False, None, "numeric", NO_ANSWER)
    return math_verify_check(completion, gold, timeout_s=timeout_s)
  text, number = found
  return Verdict(numbers_equal(gold_number, number), text, "numeric")
