"""Where a run's training data come from: `load_records(config)` (evaluation sets: `eval_sets`).

config.data (configs/base.py) picks the training data:
  source: synthetic | gsm8k-aug | gsm8k-aug-nl | commonsense | strategy.
  format "jsonl" reads `path`: "" is the source's HF hub dataset (`pip install -e .[hub]`); a file's
    layout is detected (`detect_layout`): `.txt` or `question||cot #### answer` lines (GSM8k-Aug);
    JSON/JSONL rows with a `cot` field (the hub layout); rows with `question` and an `answer`
    ending in `#### N` (GSM8k, converted as `formats.gsm8k_train_rows`: calculator steps for
    gsm8k-aug, reasoning text for gsm8k-aug-nl). Format "tfds" reads the ArrayRecord dataset that
    `tfds_gsm8k_aug` built in `tfds_data_dir`: the same records, hence the same batches.
  valid_path: a validation file (same detection); "" takes the tfds `valid` split when there is
    one, else a seeded hold-out of the training records.
Then the reference's filters and templating apply (readers.clean_gsm8k_aug), and every report counts
what was dropped and why.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from codi_jax.config_rules import Bool, Enum, Int, Num, Str
from codi_jax.data import formats, multiplication, readers, synthetic
from codi_jax.data.readers import Row
from codi_jax.errors import InputError
from codi_jax.options import option, section

FORMATS = ("jsonl", "tfds")
_TFDS_CONFIGS = {"gsm8k-aug": "aug", "gsm8k-aug-nl": "nl"}

SOURCES = ("synthetic", "multiplication", *sorted(readers.TRAIN_SETS))


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """`config.data`: the training set, its cleaning, batches and padding."""

  source: str = option(Enum(SOURCES, doc="training set"))
  path: str = option(Str(doc="local file or folder, else the source's hub id"))
  valid_path: str = option(Str(doc="validation file; '' = a hold-out"))
  valid_size: int = option(Int(1, doc="hold-out size (at most a tenth of the data)"))
  format: str = option(Enum(FORMATS, doc="jsonl | tfds"))
  tfds_data_dir: str = option(Str(doc="format=tfds: the TFDS data_dir"))
  synthetic: synthetic.SyntheticOptions = section(synthetic.SyntheticOptions)
  multiplication: multiplication.MultiplicationOptions = section(
    multiplication.MultiplicationOptions
  )
  include_last_cot: bool = option(Bool(doc="keep the last CoT step (reference: drop it)"))
  keep_non_digit_answers: bool = option(Bool(doc="keep answers not starting with a digit"))
  max_token_num: int = option(Int(1, doc="longest example kept, in tokens"))
  batch_size: int = option(Int(1, doc="global training batch"))
  buckets: int = option(Int(1, doc="length bucket granularity (tokens)"))
  max_padding: float = option(
    Num(
      ge=0,
      lt=1,
      f32=False,
      doc="training segment padding bound (fraction); 0: multiples of buckets",
    )
  )


# ---------------------------------------------------------------------------------------------
# Training files


def _first_line(path: str) -> tuple[int, str]:
  try:
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          return n, line.strip()
  except FileNotFoundError:
    raise InputError(f"{path}: no such file") from None
  except IsADirectoryError:
    raise readers.directory_error(path) from None
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: cannot read ({e})") from None
  raise InputError(f"{path}: empty file")


def _row_layout(row: Any) -> str:
  is_gsm8k = isinstance(row, dict) and "cot" not in row and {"question", "answer"} <= set(row)
  return "gsm8k" if is_gsm8k else "hub"


def detect_layout(path: str | os.PathLike) -> str:
  """`pipe` (`||` lines), `gsm8k` (question + `####` answer rows) or `hub` (question, cot, answer).

  `.txt` files are `||` lines; JSON files are judged by their first row.
  """
  path = os.fspath(path)
  if path.endswith(".txt"):
    return "pipe"
  n, first = _first_line(path)
  if first.startswith("{"):
    try:
      return _row_layout(json.loads(first))
    except json.JSONDecodeError:
      return "hub"  # Its reader names the bad line.
  if first.startswith("["):
    return _row_layout(next(readers.read_rows(path), ("", None))[1])
  if "||" in first:
    return "pipe"
  raise InputError(
    f"{path}: line {n}: unknown layout; expected JSON/JSONL rows or `question||cot #### answer` "
    "lines"
  )


def _clean_converted(
  kind: str, rows: list[Row], conversion: dict, kwargs: Mapping[str, Any]
) -> tuple[list[dict], dict]:
  """The reference's filters on converted rows; one report counting both stages' drops."""
  if not rows:
    raise InputError(f"{conversion['source']}: no readable rows ({formats.summary(conversion)})")
  records, rep = readers.clean_gsm8k_aug(
    rows, source=conversion["source"], nl=kind == "aug_nl", **kwargs
  )
  dropped = {**conversion["dropped"], **rep["dropped"]}
  return records, {**conversion, "kept": rep["kept"], "dropped": dropped}


def read_train_file(name: str, path: str | os.PathLike, **kwargs: Any) -> tuple[list[dict], dict]:
  """Training set `name` (readers.TRAIN_SETS) from a local file of any supported layout.

  `kwargs` go to the cleaner (include_last_cot, keep_non_digit_answers, ...).
  """
  if name not in readers.TRAIN_SETS:
    raise InputError(f"unknown training set {name!r}; expected one of {sorted(readers.TRAIN_SETS)}")
  path = os.fspath(path)
  kind = readers.TRAIN_SETS[name].kind
  layout = detect_layout(path)
  if layout == "hub":
    return readers.read_train_set(name, path, **kwargs)
  if kind not in ("aug", "aug_nl"):
    raise InputError(
      f"{path}: a {layout} file holds math problems; source {name!r} needs JSON rows with "
      "question, cot and answer"
    )
  if layout == "pipe":
    if kind == "aug_nl":
      raise InputError(
        f"{path}: `||` lines hold calculator steps only; gsm8k-aug-nl needs GSM8k JSONL "
        "(its natural-language reasoning)"
      )
    rows, conversion = formats.pipe_rows(path)
  else:
    rows, conversion = formats.gsm8k_train_rows(path, nl=kind == "aug_nl")
  return _clean_converted(kind, rows, conversion, kwargs)


def is_file_path(source: str | os.PathLike) -> bool:
  """Whether `source` names a local file (an existing one, or a .json/.jsonl/.txt path)."""
  path = os.fspath(source)
  return os.path.isfile(path) or path.endswith((".json", ".jsonl", ".txt"))


def read_train_source(
  name: str, source: str | os.PathLike, **kwargs: Any
) -> tuple[list[dict], dict]:
  """Training set `name` from a local file (`read_train_file`), else from the hub: `source` is a
  dataset id or folder for `datasets.load_dataset` ("" = the set's own hub id)."""
  if source and is_file_path(source):
    return read_train_file(name, source, **kwargs)
  return readers.read_train_set(name, os.fspath(source) or None, **kwargs)


# ---------------------------------------------------------------------------------------------
# TFDS (ArrayRecord)


def _tfds_module():
  try:
    from codi_jax.data import tfds_gsm8k_aug
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] != "tensorflow_datasets":
      raise
    raise InputError(
      "--config.data.format=tfds needs tensorflow-datasets: pip install -r requirements-tfds.txt"
    ) from None
  return tfds_gsm8k_aug


def _tfds_config(d) -> str:
  if d.source not in _TFDS_CONFIGS:
    raise InputError(
      f"--config.data.format=tfds: source {d.source!r} has no TFDS dataset; "
      f"expected one of {sorted(_TFDS_CONFIGS)}"
    )
  if not d.get("tfds_data_dir", ""):
    raise InputError("--config.data.tfds_data_dir: empty; format=tfds needs the TFDS data_dir")
  if "://" in d.tfds_data_dir:
    raise InputError(
      f"--config.data.tfds_data_dir={d.tfds_data_dir}: ArrayRecord needs random access, which "
      "bucket URLs do not give; use a local copy or a gcsfuse mount"
    )
  return _TFDS_CONFIGS[d.source]


def _tfds_records(d, split: str, kwargs: Mapping[str, Any]) -> tuple[list[dict], dict]:
  rows, conversion = _tfds_module().read_split(d.tfds_data_dir, _tfds_config(d), split)
  return _clean_converted(readers.TRAIN_SETS[d.source].kind, rows, conversion, kwargs)


# ---------------------------------------------------------------------------------------------
# The iCoT multiplication task


def multiplication_records(config, splits: Sequence[str]) -> tuple:
  """The records of `splits` (train | valid | test) of `config.data.multiplication`, then reports.

  With `config.data.path` (a folder holding the released valid.txt and test.txt, e.g. iCoT's
  data/4_by_4_mult), valid and test are those files and training pairs are generated disjoint
  from both; without it, every split is generated (disjoint: one seeded stream, cut in order).
  Records keep the iCoT text exactly (no step is dropped; the answer is the digit string).
  """
  m, d = config.data.multiplication, config.data
  files = {}
  if d.path:
    for name in ("valid", "test"):
      path = os.path.join(d.path, f"{name}.txt")
      if not os.path.isfile(path):
        raise InputError(f"--config.data.path: {d.path}: no {name}.txt (iCoT multiplication)")
      files[name] = multiplication.read_lines(path)
  sizes = {"train": m.train, "valid": m.valid, "test": m.test}
  held = [multiplication.parse_line(line) for lines in files.values() for line in lines]
  generated = [name for name in ("valid", "test", "train") if name not in files]
  stream = multiplication.generate(
    sum(sizes[n] for n in generated), m.digits, seed=config.seed, exclude=held
  )
  out, start = dict(files), 0
  for name in generated:
    out[name], start = stream[start : start + sizes[name]], start + sizes[name]
  recs, reports = [], {}
  for name in splits:
    lines = out[name][: sizes[name]]
    source = f"{d.path}/{name}.txt" if name in files else f"generated {m.digits}x{m.digits}"
    recs.append(multiplication.records(lines, source=source))
    reports[name] = {"source": source, "read": len(lines), "kept": len(lines)}
  return (*recs, reports)


# ---------------------------------------------------------------------------------------------
# A run's training and validation records


def _overlap(train: Sequence[Mapping], valid: Sequence[Mapping]) -> int:
  questions = {r["question"] for r in train}
  return sum(r["question"] in questions for r in valid)


def load_records(config) -> tuple[list[dict], list[dict], dict]:
  """(train records, validation records, reports) for `config.data`. Validation is never test.

  The validation report counts its questions also found in training (`overlap_with_train`):
  GSM8k-Aug's valid file, for one, is drawn from GSM8k's training problems.
  """
  d = config.data
  cleaning = dict(
    include_last_cot=d.include_last_cot, keep_non_digit_answers=d.keep_non_digit_answers
  )
  if d.source == "multiplication":
    train, valid, reports = multiplication_records(config, ("train", "valid"))
    return train, valid, reports
  if d.source == "synthetic":
    s = d.synthetic
    diff = synthetic.Difficulty.from_config(s.to_dict())
    train, rep_t = readers.prepare_train_records(
      synthetic.generate("train", s.train, seed=config.seed, difficulty=diff),
      kind="aug",
      source="synthetic:train",
      **cleaning,
    )
    valid, rep_v = readers.prepare_train_records(
      synthetic.generate("valid", s.valid, seed=config.seed, difficulty=diff),
      kind="aug",
      source="synthetic:valid",
      **cleaning,
    )
    return train, valid, {"train": rep_t, "valid": rep_v}
  fmt = d.get("format", "jsonl")
  if fmt not in FORMATS:
    raise InputError(f"--config.data.format: unknown format {fmt!r}; expected one of {FORMATS}")
  if fmt == "tfds":
    records, rep = _tfds_records(d, "train", cleaning)
  else:
    records, rep = read_train_source(d.source, d.path, **cleaning)
  valid = None
  if d.valid_path:
    valid, rep_v = read_train_source(d.source, d.valid_path, **cleaning)
  elif fmt == "tfds" and "valid" in _tfds_module().splits(d.tfds_data_dir, _tfds_config(d)):
    valid, rep_v = _tfds_records(d, "valid", cleaning)
  if valid is not None:
    rep_v["overlap_with_train"] = _overlap(records, valid)
    if rep_v["overlap_with_train"]:
      logging.warning(
        "%d of %d validation questions also appear in training (%s)",
        rep_v["overlap_with_train"],
        len(valid),
        rep_v["source"],
      )
    return records, valid, {"train": rep, "valid": rep_v}
  rng = np.random.default_rng(config.seed)
  order = rng.permutation(len(records))
  n_valid = min(d.valid_size, len(records) // 10)
  valid = [records[i] for i in order[:n_valid]]
  train = [records[i] for i in order[n_valid:]]
  return train, valid, {"train": rep, "valid": {"source": "hold-out of train", "kept": len(valid)}}
