"""Answer extraction and scoring, exactly as the official CODI `test.py` (docs/codi.md 7.2).

Predictions and golds compare with plain `==`, as the reference does: floats for math, letters for
CommonsenseQA, bools for StrategyQA.
"""

from __future__ import annotations

import re
from typing import Any

_NUMBER = re.compile(r"-?\d+\.?\d*")
ANSWER_PROMPT = "The answer is:"
TASKS = ("math", "commonsense", "strategy", "digits")

Answer = float | str | bool | None


def extract_math(text: str) -> float:
  """The last number in `text` (commas removed) as a float; inf when there is none."""
  numbers = _NUMBER.findall(text.replace(",", ""))
  return float(numbers[-1]) if numbers else float("inf")


def extract_commonsense(text: str) -> float | str:
  """A number if `text` has one (as the reference), else the letter after `The answer is:`.

  The letter is the first character after the last `The answer is:` (the whole text if absent),
  and "C" when that is not one of A-E.
  """
  text_nc = text.replace(",", "")
  numbers = _NUMBER.findall(text_nc)
  if numbers:
    return float(numbers[-1])
  tail = text_nc.split(ANSWER_PROMPT)[-1].strip()
  # The reference crashes on an empty tail (tail[0]); we answer "C" as for any non-letter.
  return tail[0] if tail and tail[0] in "ABCDE" else "C"


def extract_strategy(text: str) -> float | bool | None:
  """A number if `text` has one, else True/False by substring; None (never correct) otherwise.

  The reference raises ValueError when neither word appears; we score it as wrong instead.
  """
  text_nc = text.replace(",", "")
  numbers = _NUMBER.findall(text_nc)
  if numbers:
    return float(numbers[-1])
  if "True" in text_nc:
    return True
  if "False" in text_nc:
    return False
  return None


def extract_digits(text: str) -> str:
  """The digits after the last `The answer is:` (the whole text if absent), spaces dropped: the
  iCoT multiplication answers, written digit by digit (least significant first)."""
  return "".join(ch for ch in text.split(ANSWER_PROMPT)[-1] if ch.isdigit())


def extract_answer(text: str, task: str = "math") -> Answer:
  """The predicted answer of a decoded generation for `task` (one of TASKS)."""
  if task == "math":
    return extract_math(text)
  if task == "digits":
    return extract_digits(text)
  if task == "commonsense":
    return extract_commonsense(text)
  if task == "strategy":
    return extract_strategy(text)
  raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def gold_answer(value: Any, task: str = "math") -> float | str | bool:
  """The gold answer of an evaluation row, parsed as the reference's `test.py` does.

  Bools and "True"/"False" become bools; A-E letters stay strings; otherwise the text after the
  last `####` (if any), commas removed, as a float (inf if it does not parse). The "digits" task
  keeps the digit string (exact match, as iCoT scores multiplication).
  """
  if task == "digits":
    return "".join(ch for ch in str(value) if ch.isdigit())
  if isinstance(value, bool):
    return value
  if isinstance(value, (int, float)):
    # The reference assumes strings; numeric fields (e.g. SVAMP's `Answer`) are the number itself.
    return float(value)
  value = str(value)
  if value in ("True", "False"):
    return value == "True"
  if value in "ABCDE":  # A substring test, as in the reference.
    return value
  text = value.split("####")[-1] if "####" in value else value
  try:
    return float(text.replace(",", ""))
  except ValueError:
    return float("inf")


def is_correct(pred: Answer, gold: float | str | bool) -> bool:
  """Exact equality, as the reference (so 18 == 18.0, and True == 1.0)."""
  return bool(pred == gold)


def accuracy(preds: list[Answer], golds: list[float | str | bool]) -> float:
  """Fraction of `preds` equal to their gold."""
  if len(preds) != len(golds):
    raise ValueError(f"{len(preds)} predictions for {len(golds)} golds")
  if not golds:
    return 0.0
  return sum(is_correct(p, g) for p, g in zip(preds, golds)) / len(golds)
