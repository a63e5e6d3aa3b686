"""Readers of the public math sets' own file formats, from any local path.

Formats (one example per line):
  GSM8k (`train.jsonl`, `test.jsonl`): JSON objects {"question", "answer"}; `answer` is the
    reasoning, each calculator result annotated as `<<48/2=24>>`, then a last line `#### 72`.
  `||` lines (GSM8k-Aug's `valid.txt`/`test.txt`, iCoT's multiplication files):
    `question||<<a=b>> <<c=d>> #### answer`.
The evaluation sets' own formats (SVAMP, GSM-Hard, MultiArith) are read by `eval_sets`.

GSM8k converts to training rows {question, cot, answer}: GSM8k-Aug style keeps the `<<..>>` spans
of the reasoning in order, joined by single spaces (GSM8k's test file converts to GSM8k-Aug's
`test.txt`, line for line); NL style keeps the reasoning text without the spans, one sentence per
line (`nl_cot`). The answer is the number after `####` with commas removed; `||` rows keep the
file's answer text. Rows that cannot be read (a missing field, an empty question, no `####`, an
unparseable answer) are counted by reason in the returned report, the first few named by file and
line; malformed JSON raises InputError naming the line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from codi_jax.data import readers
from codi_jax.data.readers import Row
from codi_jax.errors import InputError

MAX_NAMED = 5  # bad rows named in a report; the rest are only counted
_SPAN = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_BAD = ("missing_field", "not_text", "empty_question", "no_####", "no_||", "bad_answer")


def new_report(source: str, fmt: str) -> dict:
  """An empty report: rows read and kept, drops by reason, the first few bad rows named, and
  `empty_cot`, the kept rows with no reasoning (e.g. GSM8k rows without calculator steps)."""
  dropped = dict.fromkeys(_BAD, 0)
  return dict(source=source, format=fmt, read=0, kept=0, dropped=dropped, bad_rows=[], empty_cot=0)


def drop(report: dict, where: str, reason: str, detail: str) -> None:
  """Counts a bad row under `reason`, naming it (`where`: `detail`) while fewer than MAX_NAMED are."""
  report["dropped"][reason] += 1
  if len(report["bad_rows"]) < MAX_NAMED:
    report["bad_rows"].append(f"{where}: {detail}")


def text_fields(report: dict, row: Row, names: tuple[str, ...]) -> list[str] | None:
  """The string fields `names` of `row`, or None (the row counted as bad) if one is not."""
  where, data = row
  values = []
  for name in names:
    value = data.get(name)
    if value is None:
      drop(report, where, "missing_field", f"missing field {name!r}")
      return None
    if not isinstance(value, str):
      drop(report, where, "not_text", f"field {name!r} is {type(value).__name__}, not text")
      return None
    values.append(value)
  return values


def parse_number(text: str) -> float | None:
  """`text` (commas removed, stripped) as a float if it is a plain decimal number, else None."""
  text = text.replace(",", "").strip()
  return float(text) if _NUMBER.fullmatch(text) else None


# ---------------------------------------------------------------------------------------------
# GSM8k and `||` lines


def aug_cot(reasoning: str) -> str:
  """GSM8k-Aug-style CoT: the `<<..>>` calculator spans of `reasoning`, in order, space-joined."""
  return " ".join(_SPAN.findall(reasoning))


def nl_cot(reasoning: str) -> str:
  """GSM8k-Aug-NL-style CoT: `reasoning` without its `<<..>>` spans, one sentence per line.

  Lines are joined by spaces, a period ending each line that has no final `.`, `!` or `?` (a
  third of GSM8k's rows have such lines): the reference's drop-last-sentence then drops the last
  line, not the whole CoT.
  """
  lines = (line.strip() for line in _SPAN.sub("", reasoning).split("\n"))
  return " ".join(line if line.endswith((".", "!", "?")) else line + "." for line in lines if line)


def split_gsm8k_answer(answer: str) -> tuple[str, str] | None:
  """GSM8k's `answer` as (reasoning, final answer text after the last `####`); None without one."""
  if "####" not in answer:
    return None
  reasoning, _, final = answer.rpartition("####")
  return reasoning, final.strip()


def gsm8k_train_rows(path: str | os.PathLike, *, nl: bool = False) -> tuple[list[Row], dict]:
  """GSM8k JSONL as GSM8k-Aug-style (or NL-style with `nl`) rows {question, cot, answer}."""
  path = os.fspath(path)
  report = new_report(path, "gsm8k-jsonl")
  rows = []
  for row in readers.read_rows(path):
    report["read"] += 1
    where = row[0]
    fields = text_fields(report, row, ("question", "answer"))
    if fields is None:
      continue
    question, answer = fields
    if not question.strip():
      drop(report, where, "empty_question", "empty question")
      continue
    parts = split_gsm8k_answer(answer)
    if parts is None:
      drop(report, where, "no_####", "no '####' in field 'answer'")
      continue
    reasoning, final = parts
    if parse_number(final) is None:
      drop(report, where, "bad_answer", f"answer {final!r} after '####' is not a number")
      continue
    cot = nl_cot(reasoning) if nl else aug_cot(reasoning)
    report["empty_cot"] += not cot
    rows.append((where, dict(question=question, cot=cot, answer=final.replace(",", ""))))
  report["kept"] = len(rows)
  return rows, report


def _lines(path: str) -> list[str]:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().split("\n")
  except FileNotFoundError:
    raise InputError(f"{path}: no such file") from None
  except IsADirectoryError:
    raise readers.directory_error(path) from None
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: cannot read ({e})") from None


def pipe_rows(path: str | os.PathLike) -> tuple[list[Row], dict]:
  """`question||cot #### answer` lines as rows {question, cot, answer}; blank lines are skipped.

  The answer is the text after the last `####` as written (GSM8k-Aug keeps commas, the
  multiplication files space their digits); the cot is the text before it, stripped.
  """
  path = os.fspath(path)
  report = new_report(path, "pipe-lines")
  rows = []
  for n, line in enumerate(_lines(path), 1):
    line = line.rstrip("\r")
    if not line.strip():
      continue
    report["read"] += 1
    where = f"{path}: line {n}"
    if "||" not in line:
      drop(report, where, "no_||", "no '||' between question and reasoning")
      continue
    question, _, target = line.partition("||")
    if not question.strip():
      drop(report, where, "empty_question", "empty question")
      continue
    if "####" not in target:
      drop(report, where, "no_####", "no '####' before the answer")
      continue
    cot, _, answer = target.rpartition("####")
    if not answer.strip():
      drop(report, where, "bad_answer", "empty answer after '####'")
      continue
    report["empty_cot"] += not cot.strip()
    rows.append((where, dict(question=question, cot=cot.strip(), answer=answer.strip())))
  report["kept"] = len(rows)
  return rows, report


def summary(report: Mapping[str, Any]) -> str:
  """One line for a report: rows read/kept, non-zero drops, the first bad row."""
  dropped = ", ".join(f"{k}={v}" for k, v in report.get("dropped", {}).items() if v) or "none"
  first = report.get("bad_rows") or []
  tail = f"; first: {first[0]}" if first else ""
  return f"read {report['read']}, kept {report['kept']}, dropped: {dropped}{tail}"
