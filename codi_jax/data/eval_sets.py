"""Evaluation sets for CODI runs: a run's own splits, the named public sets and local files, as
questions, parsed golds and (for probing) each problem's reference intermediate results."""

from __future__ import annotations

import dataclasses
import os

from codi_jax.codi import probe
from codi_jax.data import answers, readers, sources, synthetic
from codi_jax.errors import InputError


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
  """The answer-extraction task of a run's data (math | commonsense | strategy)."""
  return {"commonsense": "commonsense", "strategy": "strategy"}.get(config.data.source, "math")


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


def _eval_set(
  name: str, out_name: str, source, task: str, limit: int | None, steps: bool
) -> EvalData:
  recs, rep = readers.read_eval_set(name, source, limit=limit)
  spec = readers.EVAL_SETS[name]
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


def load_eval_data(spec: str, config, *, limit: int | None = None, steps: bool = False) -> EvalData:
  """One --data entry as an evaluation set.

  `spec` is `test` / `valid` (the run's own split), `synthetic:<split>`, an eval-set name (gsm8k,
  svamp, gsm-hard, multiarith, commonsense), `<name>=<file>[,<file>...]` (that set's field layout
  from local files), or a .json/.jsonl file with `question` and `answer` fields. `steps` also
  reads each problem's reference intermediate results (for probing).
  """
  source = config.data.source
  if spec == "test":
    if source == "synthetic":
      return _synthetic(config, "test", limit)
    default = {"gsm8k-aug": "gsm8k", "gsm8k-aug-nl": "gsm8k", "commonsense": "commonsense"}.get(
      source
    )
    if default is None:
      raise InputError(
        f"--data: no default test set for data.source={source!r}; pass --data=<file>"
      )
    return load_eval_data(default, config, limit=limit, steps=steps)
  if spec == "valid":
    return (
      _synthetic(config, "valid", limit) if source == "synthetic" else _validation(config, limit)
    )
  if spec.startswith("synthetic:"):
    split = spec.split(":", 1)[1]
    if split not in ("valid", "test"):
      raise InputError(f"--data={spec}: synthetic evaluation splits are valid and test")
    return _synthetic(config, split, limit)
  if spec in readers.EVAL_SETS:
    return _eval_set(spec, spec, None, readers.EVAL_SETS[spec].task, limit, steps)
  name, sep, files = spec.partition("=")
  if sep:
    if name not in readers.EVAL_SETS:
      raise InputError(
        f"--data={spec}: unknown evaluation set {name!r}; expected one of "
        f"{sorted(readers.EVAL_SETS)}"
      )
    paths = [p for p in files.split(",") if p]
    return _eval_set(name, name, paths, readers.EVAL_SETS[name].task, limit, steps)
  if not readers.is_local(spec):
    raise InputError(
      f"--data={spec}: not a .json/.jsonl file, and not one of test, valid, "
      f"synthetic:<split>, {', '.join(sorted(readers.EVAL_SETS))}"
    )
  # A plain file has the question/answer field names of GSM8k (or CommonsenseQA for its runs).
  fields = "commonsense" if config_task(config) == "commonsense" else "gsm8k"
  stem = os.path.splitext(os.path.basename(spec))[0]
  return _eval_set(fields, stem, spec, config_task(config), limit, steps)
