"""Rows of local JSON/JSONL files or HF hub datasets, and CODI's training sets read from them.

Training sets get the official filtering and templating (docs/codi.md 6.2) and a report counting every
dropped example by reason (evaluation sets: `eval_sets.load_eval_data`, which reads rows here). Bad
input raises InputError naming the file, the line (1-based) and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from codi_jax.errors import InputError

# A row: where it came from ("file.jsonl: line 3", "id [train]: row 3") and its fields.
Row = tuple[str, Mapping[str, Any]]
Source = str | os.PathLike | Sequence[str | os.PathLike]

_FIELDS = ("question", "cot", "answer")
_STEP_RESULT = re.compile(r"=\s*(-?[\d,]*\.?\d+)\s*>>")
_WS = re.compile(r"\s*")


@dataclasses.dataclass(frozen=True)
class TrainSet:
  """A training set: its cleaning rule (`aug`, `aug_nl` or `qa`) and default hub location."""

  kind: str
  hub_id: str
  split: str = "train"


TRAIN_SETS = {
  "gsm8k-aug": TrainSet("aug", "zen-E/GSM8k-Aug"),
  "gsm8k-aug-nl": TrainSet("aug_nl", "zen-E/GSM8k-Aug-NL"),
  "commonsense": TrainSet("qa", "zen-E/CommonsenseQA-GPT4omini"),
  "strategy": TrainSet("qa", "zen-E/StrategyQA_CoT_GPT4o"),
}

# ---------------------------------------------------------------------------------------------
# Rows from files and the hub


def is_local(source: str | os.PathLike) -> bool:
  """Whether `source` names a local JSON/JSONL file (an existing file, or a .json/.jsonl path).

  Anything else (a hub id, a local dataset folder) goes to `datasets.load_dataset`.
  """
  path = os.fspath(source)
  return os.path.isfile(path) or path.endswith((".json", ".jsonl"))


def read_rows(
  source: Source, *, splits: Sequence[str] = ("train",), config: str | None = None
) -> Iterator[Row]:
  """Rows of local JSON (a list of objects) / JSONL files, or of hub `splits`, concatenated."""
  sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
  for s in sources:
    if is_local(s):
      yield from _file_rows(os.fspath(s))
    else:
      yield from _hub_rows(os.fspath(s), config, splits)


_DATA_FILE = "a JSON/JSONL file or `question||cot #### answer` lines"


def directory_error(path: str, why: str = "") -> InputError:
  """A directory given where a data file was expected: one line saying so (`why`: what was tried)."""
  return InputError(f"{path}: a directory, not a data file{why}; pass {_DATA_FILE}")


def _file_rows(path: str) -> Iterator[Row]:
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise InputError(f"{path}: no such file") from None
  except IsADirectoryError:
    raise directory_error(path) from None
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: cannot read ({e})") from None
  start = _WS.match(text).end()
  # `.json` files holding JSON lines (as HF writes them) read as JSONL.
  if text[start : start + 1] == "[":
    yield from _json_list_rows(path, text, start)
  else:
    yield from _jsonl_rows(path, text)


def _jsonl_rows(path: str, text: str) -> Iterator[Row]:
  for n, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputError(f"{path}: line {n}: invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(obj, dict):
      raise InputError(f"{path}: line {n}: expected a JSON object, got {type(obj).__name__}")
    yield f"{path}: line {n}", obj


def _json_list_rows(path: str, text: str, start: int) -> Iterator[Row]:
  """Elements of a JSON list, each named by the line it starts on."""
  decoder = json.JSONDecoder()

  def line_of(i: int) -> int:
    return text.count("\n", 0, i) + 1

  i = _WS.match(text, start + 1).end()
  if text[i : i + 1] == "]":
    i = _WS.match(text, i + 1).end()
  else:
    while True:
      try:
        obj, end = decoder.raw_decode(text, i)
      except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
      if not isinstance(obj, dict):
        raise InputError(
          f"{path}: line {line_of(i)}: expected a JSON object, got {type(obj).__name__}"
        )
      yield f"{path}: line {line_of(i)}", obj
      i = _WS.match(text, end).end()
      if text[i : i + 1] == ",":
        i = _WS.match(text, i + 1).end()
      elif text[i : i + 1] == "]":
        i = _WS.match(text, i + 1).end()
        break
      else:
        raise InputError(f"{path}: line {line_of(i)}: invalid JSON (expected ',' or ']')")
  if i != len(text):
    raise InputError(f"{path}: line {line_of(i)}: invalid JSON (extra data after the list)")


def _hub_rows(hub_id: str, config: str | None, splits: Sequence[str]) -> Iterator[Row]:
  folder = os.path.isdir(hub_id)  # a local dataset folder, also read by `datasets.load_dataset`
  try:
    import datasets  # Optional and heavy: only hub reading needs it.
  except ImportError:
    if folder:
      raise directory_error(
        hub_id, " (a dataset folder needs the `datasets` package: pip install -e .[hub])"
      ) from None
    raise InputError(
      f"{hub_id}: reading from the HF hub needs the `datasets` package (pip install -e .[hub]); "
      "or pass a local file (JSON/JSONL, or `question||cot #### answer` lines)"
    ) from None
  try:
    ds = datasets.load_dataset(hub_id, config) if config else datasets.load_dataset(hub_id)
  except Exception as e:  # Offline, unknown id, bad config: datasets raises many types.
    reason = " ".join(str(e).split())
    if folder:
      raise directory_error(
        hub_id, f" `datasets.load_dataset` can read ({type(e).__name__}: {reason})"
      ) from None
    raise InputError(
      f"{hub_id}: cannot load from the HF hub ({type(e).__name__}: {reason}); "
      "offline? pass a local .json/.jsonl file"
    ) from None
  for split in splits:
    if split not in ds:
      raise InputError(f"{hub_id}: no split {split!r} (has {', '.join(map(str, ds))})")
    for i, row in enumerate(ds[split], 1):
      yield f"{hub_id} [{split}]: row {i}", row


def _named_rows(examples: Iterable[Mapping[str, Any]], source: str) -> Iterator[Row]:
  for i, example in enumerate(examples, 1):
    if not isinstance(example, Mapping):
      raise InputError(f"{source}: record {i}: expected a mapping, got {type(example).__name__}")
    yield f"{source}: record {i}", example


def field(row: Row, name: str, kinds: tuple[type, ...] = (str,), nullable: bool = False) -> Any:
  """Field `name` of `row`, of one of `kinds` (or None if `nullable`); else InputError naming
  the row's file and line and the field."""
  where, data = row
  if name not in data:
    raise InputError(f"{where}: missing field {name!r}")
  value = data[name]
  if value is None and nullable:
    return None
  if not isinstance(value, kinds):
    expected = " or ".join(k.__name__ for k in kinds)
    raise InputError(f"{where}: field {name!r} must be {expected}, got {type(value).__name__}")
  return value


def _field_names(fields: Mapping[str, str] | None) -> dict[str, str]:
  names = dict(zip(_FIELDS, _FIELDS))
  for key, value in (fields or {}).items():
    if key not in names:
      raise InputError(f"fields: unknown key {key!r}; expected some of {_FIELDS}")
    names[key] = value
  return names


def finish(records: list[dict], report: dict) -> tuple[list[dict], dict]:
  """(records, report) with the kept count; InputError, with the drops by reason, if none kept."""
  report["kept"] = len(records)
  if not records:
    dropped = ", ".join(f"{k}={v}" for k, v in report["dropped"].items()) or "none"
    raise InputError(
      f"{report['source']}: no examples left after filtering (read {report['read']}; "
      f"dropped: {dropped})"
    )
  return records, report


# ---------------------------------------------------------------------------------------------
# Training sets (docs/codi.md 6.2)


def step_result(step: str) -> float | None:
  """The result of a GSM8k-Aug step such as `<<16-3-4=9>>` (9.0); None if it has none."""
  match = _STEP_RESULT.search(step)
  if match is None:
    return None
  try:
    return float(match.group(1).replace(",", ""))
  except ValueError:
    return None


def clean_gsm8k_aug(
  rows: Iterable[Row],
  *,
  source: str,
  nl: bool = False,
  include_last_cot: bool = False,
  keep_non_digit_answers: bool = False,
  fields: Mapping[str, str] | None = None,
  limit: int | None = None,
) -> tuple[list[dict], dict]:
  """GSM8k-Aug (or -NL with `nl`) rows as the reference formats them, with a drop report.

  Drops the last CoT step (sentence for NL) unless `include_last_cot`; keeps the last word of
  `answer` with `####` removed, skipping it unless it starts with a digit. Records are
  {question, cot, answer, steps} (+ `results`, each step's value, for the `<<..>>` format).
  """
  names = _field_names(fields)
  report = {"source": source, "read": 0, "kept": 0}
  report["dropped"] = dict.fromkeys(("null_answer", "empty_answer", "non_digit_answer"), 0)
  records = []
  for row in rows:
    if limit is not None and report["read"] >= limit:
      break
    report["read"] += 1
    question = field(row, names["question"])
    raw_cot = field(row, names["cot"])
    raw_answer = field(row, names["answer"], (str, int, float), nullable=True)
    if raw_answer is None:
      report["dropped"]["null_answer"] += 1
      continue
    answer = str(raw_answer).split(" ")[-1]
    if answer and not answer[0].isdigit() and not keep_non_digit_answers:
      report["dropped"]["non_digit_answer"] += 1
      continue
    answer = answer.replace("####", "")
    if not answer:
      report["dropped"]["empty_answer"] += 1
      continue
    if nl:
      steps = raw_cot.split(". ")
      kept = steps if include_last_cot else steps[:-1]
      cot = ". ".join(kept) + ".\n" if kept else ""
    else:
      steps = raw_cot.split(" ")
      kept = steps if include_last_cot else steps[:-1]
      cot = " ".join(kept)
    record = dict(question=question, cot=cot, answer=answer, steps=[s for s in steps if s])
    if not nl:
      record["results"] = [step_result(s) for s in record["steps"]]
    records.append(record)
  return finish(records, report)


def clean_qa_cot(
  rows: Iterable[Row],
  *,
  source: str,
  fields: Mapping[str, str] | None = None,
  limit: int | None = None,
) -> tuple[list[dict], dict]:
  """CommonsenseQA-CoT / StrategyQA-CoT rows: stripped question and CoT, each ending in a newline.

  The CoT keeps its last step, as the reference; answers (letters, bools) become text.
  """
  names = _field_names(fields)
  report = {"source": source, "read": 0, "kept": 0, "dropped": {"empty_answer": 0}}
  records = []
  for row in rows:
    if limit is not None and report["read"] >= limit:
      break
    report["read"] += 1
    question = field(row, names["question"])
    cot = field(row, names["cot"])
    answer = str(field(row, names["answer"], (str, bool, int, float))).strip()
    if not answer:
      report["dropped"]["empty_answer"] += 1
      continue
    records.append(dict(question=question.strip() + "\n", cot=cot.strip() + "\n", answer=answer))
  return finish(records, report)


def prepare_train_records(
  examples: Iterable[Mapping[str, Any]], kind: str = "aug", *, source: str = "records", **kwargs
) -> tuple[list[dict], dict]:
  """In-memory examples (e.g. `synthetic.generate`) cleaned by rule `kind` (aug, aug_nl, qa)."""
  return _clean(kind, _named_rows(examples, source), source, kwargs)


def _clean(kind: str, rows: Iterable[Row], source: str, kwargs: dict) -> tuple[list[dict], dict]:
  if kind == "aug":
    return clean_gsm8k_aug(rows, source=source, **kwargs)
  if kind == "aug_nl":
    return clean_gsm8k_aug(rows, source=source, nl=True, **kwargs)
  if kind == "qa":
    return clean_qa_cot(rows, source=source, **kwargs)
  raise InputError(f"unknown training-set kind {kind!r}; expected aug, aug_nl or qa")


def read_train_set(
  name: str, source: Source | None = None, *, split: str | None = None, **kwargs
) -> tuple[list[dict], dict]:
  """Training set `name` (see TRAIN_SETS) from local files or the hub, cleaned, with its report.

  `kwargs` go to the cleaner: include_last_cot, keep_non_digit_answers (GSM8k-Aug only),
  fields (our name -> the file's field name), limit (rows read).
  """
  if name not in TRAIN_SETS:
    raise InputError(f"unknown training set {name!r}; expected one of {sorted(TRAIN_SETS)}")
  spec = TRAIN_SETS[name]
  source = spec.hub_id if source is None else source
  rows = read_rows(source, splits=(split or spec.split,))
  return _clean(spec.kind, rows, source_name(source), kwargs)


def source_name(source: Source) -> str:
  """`source` for a report: the path or hub id, several joined by ` + `."""
  if isinstance(source, (str, os.PathLike)):
    return os.fspath(source)
  return " + ".join(os.fspath(s) for s in source)
