"""A training config as one typed, frozen `TrainOptions`: the run-level fields here, each section's
class beside the code that reads it (model and tokenizer: codi/build.py, method: codi/method_options.py,
data: data/sources.py, optimiser: train_step.py, validation: eval_runner.py, mesh: sharding.py,
checkpoints: checkpoint.py). `validate_train` is the check every entry point runs before any work.

The first failure raises one InputError line naming the field, the value and what is allowed:
`--config.optim.lr: got -1.0; expected a number > 0`.
"""

from __future__ import annotations

import dataclasses
import typing

import jax

from codi_jax import options
from codi_jax.checkpoint import CheckpointOptions
from codi_jax.codi.build import ModelOptions
from codi_jax.codi.method_options import MethodOptions
from codi_jax.config_cross import CROSS_TRAIN, train_bpe_spec
from codi_jax.config_rules import INT32_MAX, Bool, Context, Custom, Int, Str, check_tree
from codi_jax.data.sources import DataOptions
from codi_jax.eval_runner import ValidationOptions
from codi_jax.options import option, section
from codi_jax.sharding import AXIS_RULES, MeshOptions
from codi_jax.train_step import OptimOptions


def _tokenizer_ok(v) -> bool:
  if v in ("model", "gpt2"):
    return True
  bpe = train_bpe_spec(v)
  return bpe is not None and (v == "train_bpe" or 257 <= bpe[0] <= 10**7)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  """A whole training config (configs/*.py), checked and frozen."""

  seed: int = option(Int(0, INT32_MAX - 2, doc="random seed (seed + 1 and + 2 seed other streams)"))
  workdir: str = option(Str(doc="output directory ('' = --workdir)"))
  overwrite: bool = option(
    Bool(doc="start over in a workdir that holds a finished run or checkpoints")
  )
  resume: bool = option(Bool(doc="continue from <workdir>/checkpoints"))
  log_every: int = option(Int(1, doc="steps between metric lines"))
  tokenizer: str = option(
    Custom(
      _tokenizer_ok,
      "model, gpt2, train_bpe or train_bpe:<vocab >= 257>[:numbers]",
      doc="tokenizer (train_bpe: digits one per token; :numbers merges whole numbers)",
    )
  )
  logical_axis_rules: tuple = option(AXIS_RULES)
  model: ModelOptions = section(ModelOptions)
  codi: MethodOptions = section(MethodOptions)
  data: DataOptions = section(DataOptions)
  optim: OptimOptions = section(OptimOptions)
  eval: ValidationOptions = section(ValidationOptions)
  mesh: MeshOptions = section(MeshOptions)
  checkpoint: CheckpointOptions = section(CheckpointOptions)


# Field path -> rule for every field of a training config (the fuzz and reference tests walk it).
TRAIN = options.rules(TrainOptions)


def validate_train(
  config,
  *,
  sections: typing.Iterable[str] | None = None,
  devices: int | None = None,
  processes: int | None = None,
  platform: str | None = None,
) -> TrainOptions | None:
  """Checks a training config before any work: keys, fields, then `CROSS_TRAIN`; returns the
  frozen `TrainOptions` (None when only some `sections` were checked).

  sections: top-level names whose values and cross rules apply (None: all), e.g. the `data`,
  `eval` and `seed` a `codi_jax.evaluate --config` override replaces. devices / processes /
  platform default to this job's.
  """
  check_tree(config, TRAIN, prefix="--config.", only=sections)
  if devices is None or processes is None or platform is None:
    devices = jax.device_count() if devices is None else devices
    processes = jax.process_count() if processes is None else processes
    platform = jax.default_backend() if platform is None else platform
  ctx = Context(devices, processes, platform)
  for rule in CROSS_TRAIN:
    if sections is None or all(f.split(".")[0] in sections for f in rule.fields):
      rule.check(config, ctx)
  return options.build(TrainOptions, config) if sections is None else None
