"""The jitted CODI training step: optimizer, loss + gradients + update, ahead-of-time compile.

Shared by the training loop (`train_lib`) and `benchmarks/codi_step.py`, so the benchmark times
exactly the step that trains.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import optax
from flax import nnx

from codi_jax import sharding
from codi_jax.codi import losses
from codi_jax.codi.model import Codi, CodiOptions
from codi_jax.config_rules import INT32_MAX, Custom, Int, Num, is_int
from codi_jax.options import option


@dataclasses.dataclass(frozen=True)
class OptimOptions:
  """`config.optim`: AdamW, its schedule, clipping, accumulation and the run's length."""

  lr: float = option(Num(gt=0, doc="peak learning rate"))
  warmup_ratio: float = option(Num(ge=0, lt=1, f32=False, doc="warm-up share of the steps"))
  weight_decay: float = option(Num(ge=0, doc="AdamW weight decay"))
  b1: float = option(Num(ge=0, lt=1, doc="Adam beta1"))
  b2: float = option(Num(ge=0, lt=1, doc="Adam beta2"))
  eps: float = option(Num(gt=0, doc="Adam epsilon"))
  clip: float = option(Num(gt=0, doc="global-norm clipping threshold"))
  grad_accum: int = option(Int(1, doc="micro-batches per update"))
  num_steps: int = option(
    Custom(
      lambda v: is_int(v) and (v == 0 or 2 <= v <= INT32_MAX),
      "0 (use epochs) or an integer >= 2 (one warm-up and one decay step at least)",
      doc="optimizer steps; 0 = epochs",
    )
  )
  epochs: float = option(Num(ge=0, le=1e6, f32=False, doc="epochs when num_steps = 0"))


def make_optimizer(o: OptimOptions, num_steps: int):
  """AdamW (no decay on biases and norms), warmup + cosine to 0, global-norm clipping, accumulation.

  o: the optimiser section (an `OptimOptions`, or `config.optim` as validated)."""
  sched = optax.warmup_cosine_decay_schedule(
    0.0, o.lr, max(1, int(o.warmup_ratio * num_steps)), num_steps, 0.0
  )
  tx = optax.chain(
    optax.clip_by_global_norm(o.clip),
    optax.adamw(
      sched,
      b1=o.b1,
      b2=o.b2,
      eps=o.eps,
      weight_decay=o.weight_decay,
      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
    ),
  )
  if o.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum)
  return tx, sched


def restart_optimizer(tx, opt_state, params):
  """A fresh optimizer state, as a newly created AdamW (moments zero, bias-correction count 0), that
  keeps the learning-rate schedule's count and the accumulation counter: the schedule stays a
  function of the global step. Coconut and iCoT-SI restart the optimizer on their curriculum."""

  def merge(fresh, old):
    if isinstance(old, optax.ScaleByScheduleState):
      return old
    if isinstance(old, optax.MultiStepsState):
      inner = merge(fresh.inner_opt_state, old.inner_opt_state)
      return fresh._replace(inner_opt_state=inner, gradient_step=old.gradient_step)
    if isinstance(old, tuple):
      parts = [merge(f, o) for f, o in zip(fresh, old)]
      return type(old)(*parts) if hasattr(old, "_fields") else type(old)(parts)
    return fresh

  return merge(tx.init(params), opt_state)


def make_restart(tx, opt_shardings=None):
  """`restart_optimizer` jitted (the old state donated), out shardings pinned if given."""
  fn = lambda opt_state, params: restart_optimizer(tx, opt_state, params)  # noqa: E731
  return jax.jit(fn, donate_argnums=(0,), out_shardings=opt_shardings)


def make_train_step(
  graphdef,
  tx,
  key,
  opts: CodiOptions,
  dropout_on: bool,
  traces: list | None = None,
  *,
  shardings=None,
):
  """The jitted training step `(train_state, opt_state, frozen, batch, step) -> (train_state,
  opt_state, metrics)`: `losses.loss` + gradients + `tx` update, metrics with the gradient norm.

  Dropout keys are `fold_in(key, step)` when `dropout_on`; train and opt states are donated. Each
  trace appends to `traces` (if given), so callers can check the step compiles once. `shardings`
  = (train, opt, frozen, batch) pins the in/out shardings on the active mesh.
  """

  def train_step(train_state, opt_state, frozen, batch, step):
    if traces is not None:
      traces.append(1)  # trace-time only: counts compiles
    rng = jax.random.fold_in(key, step) if dropout_on else None

    def loss_fn(ts):
      return losses.loss(nnx.merge(graphdef, ts, frozen), batch, opts, rng)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_state)
    updates, opt_state = tx.update(grads, opt_state, train_state)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return optax.apply_updates(train_state, updates), opt_state, metrics

  if shardings is None:
    return jax.jit(train_step, donate_argnums=(0, 1))
  train_sh, opt_sh, frozen_sh, batch_sh = shardings
  repl = sharding.replicated()
  return jax.jit(
    train_step,
    in_shardings=(train_sh, opt_sh, frozen_sh, batch_sh, repl),
    out_shardings=(train_sh, opt_sh, repl),
    donate_argnums=(0, 1),
  )


# Seconds per StableHLO op when XLA compiles a train step for the CPU, measured on a busy 2-core
# host: 3.4-3.7 ms for tests/tiny_codi.py variants of 5k-26k ops (width 32 or 256 alike; depth
# counts only where layers are unrolled, model.scan_layers=False), 4.5 ms for SmolLM2's scanned
# step (12.7k ops, 57 s), 5.8 ms for a 3k-op Coconut step. Very large programs take longer than
# this rule says: 24 unrolled tiny layers (74k ops) had not compiled after 14 minutes.
CPU_SECONDS_PER_OP = 3.6e-3
_LINEAR_OPS = 30_000  # the largest size the rule was seen to hold for: beyond it, a lower bound


def compile_notice(lowered, what: str = "the train step") -> str:
  """The line printed before a compile: its size in HLO ops, the time that size takes on a CPU
  (ops * CPU_SECONDS_PER_OP, a lower bound past 30k ops; no rate is known for accelerators) and
  where the persistent compile cache keeps the result, which makes the next start fast."""
  ops = sum(" = " in line for line in lowered.as_text().splitlines())
  line = f"compiling {what}: {ops:,} HLO ops"
  if jax.default_backend() == "cpu":
    bound = "about" if ops <= _LINEAR_OPS else "at least"
    line += f", {bound} {_duration(ops * CPU_SECONDS_PER_OP)} on a CPU"
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    line += f"; the compile cache in {cache} ($CODI_JAX_CACHE) makes the next start fast"
  else:
    line += "; the compile cache is off ($CODI_JAX_CACHE is empty)"
  return line + "; Ctrl-C stops it"


def _duration(seconds: float) -> str:
  return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def compile_ahead(step_fn, args, wait=None) -> Any:
  """Lowers and compiles the step before step one and prints its per-device memory use.

  A notice (`compile_notice`) comes first. `wait(fn, what)` runs the compile when given: e.g.
  `checkpoint.Preemption.wait`, which keeps a signal able to end it (XLA holds the thread).
  """
  t0 = time.time()
  lowered = step_fn.lower(*args)
  if jax.process_index() == 0:
    print(compile_notice(lowered), flush=True)
  compiled = wait(lowered.compile, "compiling the train step") if wait else lowered.compile()

  def mib(b):
    return f"{b / 2**20:.1f} MiB"

  mesh = sharding.current()[0]
  line = f"compiled train step in {time.time() - t0:.1f} s on mesh {dict(mesh.shape)}"
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    m = None
  if m is not None:
    line += (
      f": per device arguments {mib(m.argument_size_in_bytes)}, outputs {mib(m.output_size_in_bytes)} "
      f"(donated/aliased {mib(m.alias_size_in_bytes)}), temporaries {mib(m.temp_size_in_bytes)}"
    )
  if jax.process_index() == 0:
    print(line, flush=True)
  return compiled


def dropout_on(codi: Codi, config) -> bool:
  """Whether any dropout (model, LoRA, projection) is active, i.e. the step needs a key."""
  m = codi.backbone.cfg
  lora = m.lora is not None and m.lora.dropout > 0
  return (
    lora
    or any(r > 0 for r in (m.embed_dropout, m.attn_dropout, m.resid_dropout))
    or (config.codi.prj_dropout > 0)
  )
