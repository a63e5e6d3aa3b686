r"""Math problems for evaluation: JSON/JSONL files (or hub datasets) in the common layouts (docs/soft_thinking.md 9).

Layouts (field names are tried in order; the first present is used):

| layout | question | answer | id | as in |
|---|---|---|---|---|
| gsm8k | question | answer, the text after its `####` line (required) | - | openai/gsm8k |
| math500 | problem | answer | unique_id | HuggingFaceH4/MATH-500 |
| aime | problem, Problem | answer, Answer | id, ID | AI-MO/aimo-validation-aime, Maxwell-Jia/AIME_2024, math-ai/aime24 |
| softthinking | prompt (a list of turns) | final_answer | - | the reference's datasets/*.json |
| auto | any of the above | any of the above (`####` read if present) | any of the above | |

Every other field of a record goes to `Problem.meta` (with `source`, the file and line), and a
GSM8K solution (the answer text before `####`) to `meta["solution"]`. Bad input raises InputError
naming the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from codi_jax.data.readers import read_rows
from codi_jax.errors import InputError

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class Problem:
  """One math problem.

  Attributes:
    id: The record's id field, else its 0-based position in the file.
    question: The problem text, as given.
    answer: The gold answer as text (for GSM8K, what follows `####`).
    meta: The record's other fields, plus `source` ("file: line N") and for GSM8K `solution`.
  """

  id: str
  question: str
  answer: str
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a record keeps its question, answer and id (names tried in order).

  Attributes:
    question: Field names of the question.
    answer: Field names of the answer.
    id: Field names of the id (none: the record's position).
    hashes: "required" (the answer is a GSM8K solution ending in `#### N`), "optional" (read
      `####` if present) or "no".
    split: Default split when reading from the hub.
  """

  question: tuple[str, ...]
  answer: tuple[str, ...]
  id: tuple[str, ...] = ()
  hashes: str = "no"
  split: str = "test"


LAYOUTS = {
  "gsm8k": Layout(("question",), ("answer",), hashes="required"),
  "math500": Layout(("problem",), ("answer",), ("unique_id",)),
  "aime": Layout(("problem", "Problem"), ("answer", "Answer"), ("id", "ID"), split="train"),
  "softthinking": Layout(("prompt",), ("final_answer",)),
  "auto": Layout(
    ("question", "problem", "Problem", "prompt"),
    ("answer", "Answer", "final_answer"),
    ("id", "ID", "unique_id"),
    hashes="optional",
  ),
}


def _names(names: Sequence[str]) -> str:
  first, rest = repr(names[0]), ", ".join(repr(n) for n in names[1:])
  return f"{first} (or {rest})" if rest else first


def _pick(where: str, record: Mapping[str, Any], names: Sequence[str], required: bool = True):
  """(name, value) of the first of `names` in `record`; (None, None) if absent and optional."""
  for name in names:
    if name in record:
      return name, record[name]
  if required:
    raise InputError(f"{where}: missing field {_names(names)}")
  return None, None


def _question(where: str, name: str, value: Any) -> str:
  if isinstance(value, list):  # The reference's [{"from": "user", "value": text}, ...].
    turns = [
      t
      for t in value
      if isinstance(t, Mapping) and t.get("from", t.get("role")) in ("user", "human")
    ]
    texts = [t.get("value", t.get("content")) for t in turns]
    if not texts or not all(isinstance(t, str) for t in texts):
      raise InputError(f"{where}: field {name!r} must be text or a list of user turns with text")
    value = "\n\n".join(texts)
  if not isinstance(value, str):
    raise InputError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
  if not value.strip():
    raise InputError(f"{where}: field {name!r} is empty")
  return value


def _answer(where: str, name: str, value: Any, hashes: str) -> tuple[str, str | None]:
  """(gold, solution) from an answer field; solution is the text before `####`, if any."""
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise InputError(
      f"{where}: field {name!r} must be text or a number, got {type(value).__name__}"
    )
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  text, solution = str(value), None
  if hashes != "no" and "####" in text:
    solution, text = (s.strip() for s in text.rsplit("####", 1))
  elif hashes == "required":
    raise InputError(f"{where}: field {name!r} has no '#### <answer>' line (GSM8K layout)")
  text = text.strip()
  if not text:
    raise InputError(f"{where}: field {name!r} is empty")
  return text, solution


def read_problems(
  source: str | os.PathLike,
  *,
  layout: str = "auto",
  question_field: str | None = None,
  answer_field: str | None = None,
  id_field: str | None = None,
  split: str | None = None,
  config: str | None = None,
  limit: int | None = None,
) -> list[Problem]:
  """Problems of a JSONL / JSON-list file (or a hub dataset id, which needs `datasets`).

  Args:
    source: A .jsonl/.json file (JSON lines, or one JSON list of objects), or a hub id.
    layout: One of LAYOUTS: where the question, answer and id fields are.
    question_field: Overrides the layout's question field names.
    answer_field: Overrides the layout's answer field names.
    id_field: Overrides the layout's id field names.
    split: Hub split (default: the layout's).
    config: Hub configuration (e.g. "main" for openai/gsm8k).
    limit: Read at most this many records.

  Returns:
    The problems, in file order.

  Raises:
    InputError: unknown layout, missing/unreadable file, invalid JSON, a record without its
      question or answer (naming file, line and field), duplicate ids, or no problems.
  """
  if layout not in LAYOUTS:
    raise InputError(f"unknown problem layout {layout!r}; expected one of {sorted(LAYOUTS)}")
  if limit is not None and limit < 1:
    raise InputError(f"limit: must be >= 1, got {limit}")
  spec = LAYOUTS[layout]
  q_names = (question_field,) if question_field else spec.question
  a_names = (answer_field,) if answer_field else spec.answer
  id_names = (id_field,) if id_field else spec.id
  problems: list[Problem] = []
  seen: dict[str, str] = {}
  rows = read_rows(source, splits=(split or spec.split,), config=config)
  for index, (where, record) in enumerate(rows):
    if limit is not None and index >= limit:
      break
    q_name, q_value = _pick(where, record, q_names)
    a_name, a_value = _pick(where, record, a_names)
    i_name, i_value = _pick(where, record, id_names, required=bool(id_field))
    question = _question(where, q_name, q_value)
    answer, solution = _answer(where, a_name, a_value, spec.hashes)
    pid = str(index) if i_name is None or i_value is None else str(i_value)
    if pid in seen:
      raise InputError(f"{where}: field {i_name!r}: duplicate id {pid!r} (first at {seen[pid]})")
    seen[pid] = where
    meta = {k: v for k, v in record.items() if k not in (q_name, a_name, i_name)}
    meta["source"] = where
    if solution is not None:
      meta["solution"] = solution
    problems.append(Problem(pid, question, answer, meta))
  if not problems:
    raise InputError(f"{os.fspath(source)}: no problems")
  return problems


def math_prompt(question: str, instruction: str = MATH_INSTRUCTION) -> str:
  """The user turn for a math problem (docs/soft_thinking.md 9.2): the instruction, a blank line, the problem."""
  return f"{instruction}\n\n{question.strip()}"


def build_math_prompt(tokenizer: Any, question: str, instruction: str = MATH_INSTRUCTION) -> str:
  """The prompt text for a math problem: one user turn, no system prompt, generation prompt on.

  Args:
    tokenizer: Anything with `apply_chat_template(messages, tokenize=False,
      add_generation_prompt=True)` returning text: codi_jax's Tokenizer or an HF tokenizer.
    question: The problem text.
    instruction: The instruction placed before the problem.

  Returns:
    The templated prompt text (encode it without adding special tokens again).
  """
  messages = [{"role": "user", "content": math_prompt(question, instruction)}]
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  if not isinstance(text, str):
    raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected text")
  return text
