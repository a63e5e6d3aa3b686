"""What the CODI train step is compiled for: trainable/frozen split, optimizer, shardings, arguments.

One construction for the training loop (`train_lib.Trainer`, on the live model) and for compiling
a run ahead for another topology (`codi_jax.compile`, on `build.abstract_model`): both compile
`train_step.make_train_step` for the `step_args` built here, so they are the same program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from codi_jax import sharding, train_step
from codi_jax.models.params import split_trainable


@dataclasses.dataclass
class StepState:
  """A model split for training, with the optimizer and every state's shardings."""

  graphdef: Any
  train_state: Any  # trained parameters (LoRA, projection, ...; everything in full fine-tuning)
  frozen: Any  # the rest (the base weights under LoRA)
  train_sh: Any
  frozen_sh: Any
  tx: Any  # optax transformation (`train_step.make_optimizer`)
  sched: Any  # learning-rate schedule of the step
  opt_sh: Any

  @property
  def num_params(self) -> tuple[int, int]:
    """(trained, all) parameter counts."""
    n_train = sum(x.size for x in jax.tree.leaves(self.train_state))
    return n_train, n_train + sum(x.size for x in jax.tree.leaves(self.frozen))


def split(codi, config, num_steps: int) -> StepState:
  """`codi` (live or abstract) split into trained and frozen state on the active mesh, with the
  optimizer for `num_steps` steps (warmup and decay depend on it)."""
  if config.model.lora_rank == 0 or not config.model.spec:  # full fine-tuning: frozen is empty
    graphdef, train_state, frozen = nnx.split(codi, nnx.Param, ...)
  else:
    extra = ("prj", "special") if config.codi.train_special_embeddings else ("prj",)
    graphdef, train_state, frozen = split_trainable(codi, extra=extra)
  train_sh = sharding.state_shardings(train_state)
  tx, sched = train_step.make_optimizer(config.optim, num_steps)  # MultiSteps: once per update
  return StepState(
    graphdef,
    train_state,
    frozen,
    train_sh,
    sharding.state_shardings(frozen),
    tx,
    sched,
    sharding.optimizer_shardings(tx, train_state, train_sh),
  )


def abstract(tree, shardings) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or shapes) placed by `shardings`."""
  return jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings
  )


def step_args(s: StepState, opt_state, batch) -> tuple[tuple, tuple]:
  """(shardings for `make_train_step`, its abstract arguments) for a global batch (arrays or
  ShapeDtypeStructs; split along the batch mesh axes as `sharding.global_batch` puts it)."""
  batch_sh = {k: sharding.batch_sharding(v.shape) for k, v in batch.items()}
  shardings = (s.train_sh, s.opt_sh, s.frozen_sh, batch_sh)
  trees = (s.train_state, opt_state, s.frozen, batch)
  args = tuple(abstract(t, sh) for t, sh in zip(trees, shardings))
  return shardings, args + (jax.ShapeDtypeStruct((), jnp.int32),)  # the live state is donated


def abstract_opt_state(s: StepState) -> Any:
  """The optimizer state's shapes with their shardings (nothing allocated)."""
  return abstract(jax.eval_shape(s.tx.init, s.train_state), s.opt_sh)
