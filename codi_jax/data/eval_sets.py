"""Evaluation sets for CODI runs: a run's own splits, the named public sets (the authors' files
from a folder or per-set paths, else the HF hub copies) and local files, as questions, parsed golds
and (for probing) each problem's reference intermediate results."""

from __future__ import annotations

import dataclasses
import importlib.util
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


# --sets names: the authors' files (sources.EVAL_FILES, read from --data_dir or --set_path) and
# CommonsenseQA; each name's HF hub copy (readers.EVAL_SETS), used when no file is given.
SET_NAMES = (*sources.EVAL_FILES, "commonsense")
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


def _file_set(key: str, path: str, data_dir: str, limit: int | None, steps: bool) -> EvalData:
  """A named set from the authors' file (`path`, else data_dir/EVAL_FILES[key])."""
  recs, rep = sources.load_eval_records(key, data_dir=data_dir, path=path, limit=limit or 0)
  return EvalData(
    key,
    "math",
    [r["question"] for r in recs],
    [r["answer"] for r in recs],
    [probe.reference_results(r) for r in recs] if steps else [[] for _ in recs],
    [r.get("cot") for r in recs],
    rep,
  )


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
    if key in paths or (data_dir and key in sources.EVAL_FILES):
      if key == "commonsense":  # no standard file: the hub's field layout from a local file
        return _eval_set("commonsense", key, paths[key], "commonsense", limit, steps)
      return _file_set(key, paths.get(key, ""), data_dir, limit, steps)
    rel = sources.EVAL_FILES.get(key, ("",))[0]
    where = (f"--data_dir=<folder holding {rel}> or " if rel else "") + f"--set_path={key}=<file>"
    if key not in _HUB_NAMES:
      raise InputError(f"--sets={spec}: no hub copy; pass {where}")
    if importlib.util.find_spec("datasets") is None:
      raise InputError(
        f"--sets={spec}: no file given ({where}), and its hub copy needs the `datasets` package "
        "(pip install -e .[hub])"
      )
    hub = _HUB_NAMES[key]
    return _eval_set(hub, key, None, readers.EVAL_SETS[hub].task, limit, steps)
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
  return _eval_set(fields, stem, spec, task, limit, steps)
