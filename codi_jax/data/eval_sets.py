"""Evaluation sets for CODI runs, all loaded by `load_eval_data`: a run's own splits, the named
public sets (the authors' files from a folder or per-set paths, else the HF hub copies) and local
files, as questions, parsed golds and (for probing) each problem's reference intermediate results.

The authors' files (EVAL_FILES) in their own formats (GSM8k and `||` lines: see `formats`):
  SVAMP (`SVAMP.json`): one JSON list of {"Body", "Question", "Answer" (a float), ...};
    the question is Body + " " + Question.
  GSM-Hard (`gsmhardv2.jsonl`): {"input", "target" (a number, often a float or large), "code"}.
  MultiArith (`mawpsmultiarith.jsonl`): {"input", "target" (a number)}.
Bad rows are counted by reason in the report; a file with none usable is an error. The hub copies
(and plain files) use the hub's field names (_HUB_SETS). Questions get the reference's cleaning and
golds parse to floats (docs/codi.md 7.3). Bad input raises InputError naming the file, the line
(1-based) and the field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Sequence
from typing import Any

from codi_jax.codi import probe
from codi_jax.data import answers, formats, readers, sources, synthetic
from codi_jax.data.readers import Row
from codi_jax.errors import InputError

# The authors' files: set -> (file under data_dir, format in _FILE_FIELDS or "pipe").
EVAL_FILES = {
  "gsm8k": ("gsm8k/test.jsonl", "gsm8k"),
  "svamp": ("svamp/SVAMP.json", "svamp"),
  "gsm_hard": ("gsm_hard/gsmhardv2.jsonl", "gsm_hard"),
  "multiarith": ("multiarith/mawpsmultiarith.jsonl", "multiarith"),
  "gsm8k_aug_test": ("gsm8k_aug/test.txt", "pipe"),
}
_EVAL_NOTES = {
  "svamp": "all rows: the reference evaluates SVAMP's train and test splits together (1,000)",
  "multiarith": "all rows of the file; the CODI paper's 180-row MultiArith test split is a subset",
}
# JSON formats of the authors' files: format -> (question fields joined by a space, answer field).
_FILE_FIELDS = {
  "gsm8k": (("question",), "answer"),
  "svamp": (("Body", "Question"), "Answer"),
  "gsm_hard": (("input",), "target"),
  "multiarith": (("input",), "target"),
}


@dataclasses.dataclass(frozen=True)
class _HubSet:
  """A set's hub copy: location (splits concatenated) and question/answer field names."""

  hub_id: str
  splits: tuple[str, ...]
  question: str
  answer: str
  config: str | None = None
  task: str = "math"


_HUB_SETS = {
  "gsm8k": _HubSet("gsm8k", ("test",), "question", "answer", config="main"),
  "svamp": _HubSet("ChilleD/SVAMP", ("train", "test"), "question_concat", "Answer"),
  "gsm-hard": _HubSet("juyoung-trl/gsm-hard", ("train",), "instruction", "response"),
  "multiarith": _HubSet("ChilleD/MultiArith", ("test",), "question", "final_ans"),
  "commonsense": _HubSet(
    "zen-E/CommonsenseQA-GPT4omini", ("validation",), "question", "answer", task="commonsense"
  ),
}


@dataclasses.dataclass
class EvalData:
  """An evaluation set: questions, parsed golds and (for probing) each problem's reference steps."""

  name: str
  task: str  # math | commonsense | strategy (answer extraction)
  questions: list[str]
  golds: list
  steps: list[list[float | None]]  # reference intermediate results ([] when unknown)
  cots: list[str | None]
  report: dict


def config_task(config) -> str:
  """The answer-extraction task of a run's data (math | commonsense | strategy | digits)."""
  tasks = {"commonsense": "commonsense", "strategy": "strategy", "multiplication": "digits"}
  return tasks.get(config.data.source, "math")


def _multiplication(config, split: str, limit: int | None) -> EvalData:
  """A split of the iCoT multiplication task: answers compared as digit strings."""
  (recs, reports) = sources.multiplication_records(config, (split,))
  recs = recs[:limit] if limit else recs
  return EvalData(
    f"multiplication_{split}",
    "digits",
    [r["question"] for r in recs],
    [answers.gold_answer(r["answer"], "digits") for r in recs],
    [[float(v) for v in r["results"]] for r in recs],
    [r["cot"] for r in recs],
    {**reports[split], "kept": len(recs)},
  )


def _synthetic(config, split: str, limit: int | None) -> EvalData:
  s = config.data.synthetic
  difficulty = synthetic.Difficulty.from_config(s.to_dict())
  size = s.test if split == "test" else s.valid
  recs = synthetic.generate(
    split, min(size, limit or size), seed=config.seed, difficulty=difficulty
  )
  return EvalData(
    f"synthetic_{split}",
    "math",
    [r["question"] for r in recs],
    [answers.gold_answer(r["answer"]) for r in recs],
    [list(map(float, r["results"])) for r in recs],
    [r["cot"] for r in recs],
    {"source": f"synthetic:{split} (seed {config.seed})", "read": len(recs), "kept": len(recs)},
  )


def _validation(config, limit: int | None) -> EvalData:
  recs = sources.load_records(config)[1][:limit]
  return EvalData(
    "valid",
    config_task(config),
    [r["question"] for r in recs],
    [answers.gold_answer(r["answer"]) for r in recs],
    [probe.reference_results(r) for r in recs],
    [r.get("cot") for r in recs],
    {"source": f"validation split of {config.data.source}", "read": len(recs), "kept": len(recs)},
  )


def _hub_set(
  name: str, out_name: str, source, task: str, limit: int | None, steps: bool
) -> EvalData:
  """Set `name` in the hub's field layout, from `source` (a local file) or else its hub copy."""
  recs, rep = _hub_records(name, source, limit=limit)
  spec = _HUB_SETS[name]
  rows = []
  if steps:  # a second pass for the raw CoT fields, which the eval-set reader does not keep
    rows = [
      row
      for _, row in zip(
        recs, readers.read_rows(source or spec.hub_id, splits=spec.splits, config=spec.config)
      )
    ]
  results = [probe.reference_results(r) for _, r in rows] if rows else [[] for _ in recs]
  cots = [r.get("cot") for _, r in rows] if rows else [None] * len(recs)
  return EvalData(
    out_name, task, [r["question"] for r in recs], [r["answer"] for r in recs], results, cots, rep
  )


# --sets names: the authors' files (EVAL_FILES, read from --data_dir or --set_path) and
# CommonsenseQA; each name's HF hub copy (_HUB_SETS), used when no file is given.
SET_NAMES = (*EVAL_FILES, "commonsense")
_HUB_NAMES = {
  "gsm8k": "gsm8k",
  "svamp": "svamp",
  "gsm_hard": "gsm-hard",
  "multiarith": "multiarith",
  "commonsense": "commonsense",
}
RUN_SPLITS = ("test", "valid", "synthetic:valid", "synthetic:test")


def set_name(spec: str) -> str | None:
  """The SET_NAMES spelling of a named set (`gsm-hard` -> `gsm_hard`), or None for other specs."""
  key = spec.replace("-", "_")
  return key if key in SET_NAMES else None


def load_eval_data(
  spec: str,
  config=None,
  *,
  limit: int | None = None,
  steps: bool = False,
  data_dir: str = "",
  paths: dict[str, str] | None = None,
) -> EvalData:
  """One --sets entry as an evaluation set.

  `spec` is `test` / `valid` (the run's own split: needs the run's `config`), `synthetic:<split>`,
  a named set (SET_NAMES: read from `paths[name]`, else from `data_dir` under its standard file
  name, else its HF hub copy, which needs the `datasets` package and network), or a .json/.jsonl
  file with `question` and `answer` fields. `steps` also reads each problem's reference
  intermediate results (for probing).
  """
  paths = paths or {}
  key = set_name(spec)
  if key is not None:
    if key in paths or (data_dir and key in EVAL_FILES):
      if key == "commonsense":  # no standard file: the hub's field layout from a local file
        return _hub_set("commonsense", key, paths[key], "commonsense", limit, steps)
      return _file_set(key, paths.get(key, ""), data_dir, limit, steps)
    rel = EVAL_FILES.get(key, ("",))[0]
    where = (f"--data_dir=<folder holding {rel}> or " if rel else "") + f"--set_path={key}=<file>"
    if key not in _HUB_NAMES:
      raise InputError(f"--sets={spec}: no hub copy; pass {where}")
    if importlib.util.find_spec("datasets") is None:
      raise InputError(
        f"--sets={spec}: no file given ({where}), and its hub copy needs the `datasets` package "
        "(pip install -e .[hub])"
      )
    hub = _HUB_NAMES[key]
    return _hub_set(hub, key, None, _HUB_SETS[hub].task, limit, steps)
  if spec in RUN_SPLITS and config is None:
    raise InputError(
      f"--sets={spec}: a run's own split, and an official checkpoint has none; name sets "
      f"({', '.join(SET_NAMES)}) or .json/.jsonl files"
    )
  source = config.data.source if config is not None else ""
  if source == "multiplication" and spec in ("test", "valid"):
    return _multiplication(config, spec, limit)
  if spec == "test":
    if source == "synthetic":
      return _synthetic(config, "test", limit)
    default = {"gsm8k-aug": "gsm8k", "gsm8k-aug-nl": "gsm8k", "commonsense": "commonsense"}.get(
      source
    )
    if default is None:
      raise InputError(
        f"--sets=test: no default test set for data.source={source!r}; name a set or a file"
      )
    return load_eval_data(default, config, limit=limit, steps=steps, data_dir=data_dir, paths=paths)
  if spec == "valid":
    return (
      _synthetic(config, "valid", limit) if source == "synthetic" else _validation(config, limit)
    )
  if spec.startswith("synthetic:"):
    split = spec.split(":", 1)[1]
    if split not in ("valid", "test"):
      raise InputError(f"--sets={spec}: synthetic evaluation splits are valid and test")
    return _synthetic(config, split, limit)
  if not readers.is_local(spec):
    raise InputError(
      f"--sets={spec}: not a .json/.jsonl file, and not one of {', '.join(RUN_SPLITS)}, "
      f"{', '.join(SET_NAMES)}"
    )
  # A plain file has the question/answer field names of GSM8k (or CommonsenseQA for its runs).
  task = config_task(config) if config is not None else "math"
  fields = "commonsense" if task == "commonsense" else "gsm8k"
  stem = os.path.splitext(os.path.basename(spec))[0]
  return _hub_set(fields, stem, spec, task, limit, steps)


# ---------------------------------------------------------------------------------------------
# The two readers behind load_eval_data: the authors' files and the hub's field layout


def _clean_question(question: str) -> str:
  """The reference's question cleaning: strip, then one pass replacing double spaces."""
  return question.strip().replace("  ", " ")


def _file_set(key: str, path: str, data_dir: str, limit: int | None, steps: bool) -> EvalData:
  """Set `key` (in EVAL_FILES) from the authors' file: `path`, else data_dir/EVAL_FILES[key]."""
  rel, kind = EVAL_FILES[key]
  if not path:
    if not data_dir:
      raise InputError(f"{key}: pass a data_dir holding {rel}, or the file's path")
    path = os.path.join(data_dir, rel)
  path = os.fspath(path)
  if os.path.isdir(path):
    raise readers.directory_error(path, f" (evaluation set {key}; a --data_dir holds {rel})")
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file (evaluation set {key}, expected layout {rel})")
  recs, rep = _file_rows(kind, path)
  if not recs:
    raise InputError(f"{path}: no usable rows for {key} ({formats.summary(rep)})")
  recs = recs[:limit] if limit and limit > 0 else recs
  rep = {**rep, "name": key, "used": len(recs)}
  if key in _EVAL_NOTES:
    rep["note"] = _EVAL_NOTES[key]
  return EvalData(
    key,
    "math",
    [r["question"] for r in recs],
    [r["answer"] for r in recs],
    [probe.reference_results(r) for r in recs] if steps else [[] for _ in recs],
    [r.get("cot") for r in recs],
    rep,
  )


def _file_rows(kind: str, path: str) -> tuple[list[dict], dict]:
  """An authors' file of format `kind` as records {question, answer (float), cot}, report.

  `cot` is the reasoning where the file has one (GSM8k, `||` lines) for probing, else None.
  """
  if kind == "pipe":
    rows, report = formats.pipe_rows(path)
    return _pipe_records(rows, report)
  q_names, a_name = _FILE_FIELDS[kind]
  report = formats.new_report(path, kind)
  del report["empty_cot"]  # These files have no reasoning.
  records = []
  for row in readers.read_rows(path):
    report["read"] += 1
    where, data = row
    parts = formats.text_fields(report, row, q_names)
    if parts is None:
      continue
    question = _clean_question(" ".join(parts))
    if not question:
      formats.drop(report, where, "empty_question", "empty question")
      continue
    if data.get(a_name) is None:
      formats.drop(report, where, "missing_field", f"missing field {a_name!r}")
      continue
    value, cot = data[a_name], None
    if kind == "gsm8k":
      if not isinstance(value, str):
        not_text = f"field {a_name!r} is {type(value).__name__}, not text"
        formats.drop(report, where, "not_text", not_text)
        continue
      parts = formats.split_gsm8k_answer(value)
      if parts is None:
        formats.drop(report, where, "no_####", f"no '####' in field {a_name!r}")
        continue
      cot, value = parts
    gold = _number(value)
    if gold is None:
      formats.drop(report, where, "bad_answer", f"answer {value!r} is not a number")
      continue
    records.append(dict(question=question, answer=gold, cot=cot))
  report["kept"] = len(records)
  return records, report


def _pipe_records(rows: list[Row], report: dict) -> tuple[list[dict], dict]:
  records = []
  for where, row in rows:
    gold = formats.parse_number(row["answer"])
    if gold is None:
      formats.drop(report, where, "bad_answer", f"answer {row['answer']!r} is not a number")
      continue
    question = _clean_question(row["question"])
    records.append(dict(question=question, answer=gold, cot=row["cot"]))
  report["kept"] = len(records)
  return records, report


def _number(value: Any) -> float | None:
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    return float(value) if math.isfinite(value) else None
  return formats.parse_number(value) if isinstance(value, str) else None


def _hub_records(
  name: str,
  source: readers.Source | None = None,
  *,
  question_field: str | None = None,
  answer_field: str | None = None,
  splits: Sequence[str] | None = None,
  limit: int | None = None,
) -> tuple[list[dict], dict]:
  """Set `name` (see _HUB_SETS) as {question, answer} records, answer the parsed gold.

  Local files replace the hub (pass SVAMP's train and test files as a list to concatenate them).
  The report counts golds that do not parse (inf, as the reference, kept) so N is explicit.
  """
  if name not in _HUB_SETS:
    raise InputError(f"unknown evaluation set {name!r}; expected one of {sorted(_HUB_SETS)}")
  spec = _HUB_SETS[name]
  q_name = question_field or spec.question
  a_name = answer_field or spec.answer
  source = spec.hub_id if source is None else source
  rows = readers.read_rows(source, splits=tuple(splits or spec.splits), config=spec.config)
  report = {"source": readers.source_name(source), "read": 0, "kept": 0, "gold_unparsed": 0}
  report["dropped"] = {}
  records = []
  for row in rows:
    if limit is not None and report["read"] >= limit:
      break
    report["read"] += 1
    question = readers.field(row, q_name)
    gold = answers.gold_answer(readers.field(row, a_name, (str, bool, int, float)))
    report["gold_unparsed"] += int(gold == float("inf"))
    records.append(dict(question=_clean_question(question), answer=gold))
  return readers.finish(records, report)
