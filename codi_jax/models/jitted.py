"""The one jitted-model helper: split a model once, jit pure functions of its weights.

`JittedModel(model)` splits the module into (graphdef, state) once, places the state on the mesh
active at construction (`codi_jax.sharding.use_mesh`), and `jit(fn)` returns a callable that runs
`fn(model, *args)` as a pure jitted function of the state: the module is rebuilt with `nnx.merge`
inside the trace, so no Python-side module state leaks into the program (the pattern of flax's
gemma sampler). Every trace is counted per function and per input signature, so callers and tests
can check "one compile per shape bucket".
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from codi_jax import sharding
from codi_jax.models.config import ModelConfig


def _signature(args, static) -> tuple:
  """Shapes/dtypes of array leaves plus static values: what a new compile is keyed on."""

  def leaf(x):
    return (tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") and hasattr(x, "dtype") else x

  leaves, treedef = jax.tree.flatten(args)
  return (str(treedef), tuple(leaf(x) for x in leaves), tuple(sorted(static.items())))


def _place(state):
  """The state on the active mesh; an abstract one (`nnx.eval_shape`) stays shapes, each with its
  sharding, so its programs can be lowered and compiled for another topology without weights."""
  leaves = jax.tree.leaves(state)
  if leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
    if sharding.current()[0] is None:
      return state
    return jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
      state,
      sharding.state_shardings(state),
    )
  return sharding.shard_state(state)


class JittedModel:
  """A model split once; `jit(fn)` gives pure jitted functions of its (sharded) weights.

  `state` may be replaced (e.g. by the training loop before a validation run) with any state of
  the same structure: jit sees it as an argument, so that does not recompile.
  """

  def __init__(self, model: nnx.Module | None = None, *, graphdef=None, state=None):
    if model is not None:
      graphdef, state = nnx.split(model)
    self.graphdef = graphdef
    self.mesh, self.rules = sharding.current()
    with self.context():
      self.state = _place(state)
    self.traces: collections.Counter = collections.Counter()  # (fn name, signature) -> traces

  def context(self):
    """The mesh context this model was placed under (re-entered around every call)."""
    return sharding.use_mesh(self.mesh, self.rules)

  def merge(self, state) -> nnx.Module:
    """The module rebuilt from a state (a tuple of states is merged in order)."""
    return nnx.merge(self.graphdef, *(state if isinstance(state, tuple) else (state,)))

  def jit(
    self,
    fn: Callable,
    *,
    static_argnames: Sequence[str] = (),
    name: str | None = None,
    carry: bool = False,
  ):
    """`fn(model, *args, **static)` -> `call(*args, state=None, **static)`, jitted once per shape.

    Results come back replicated on a mesh, so every process can read them. carry=True: fn returns
    (carry, result) and only result is replicated; carry keeps the shardings the computation gives
    it (e.g. a KV cache's logical axes) for the next call to take back in.
    """
    name = name or getattr(fn, "__name__", "fn")

    def traced(state, *args, **static):
      self.traces[name, _signature(args, static)] += 1  # trace time only
      return fn(self.merge(state), *args, **static)  # traced inside call()'s mesh context

    with self.context():
      out = sharding.replicate_out()
      jitted = jax.jit(
        traced,
        static_argnames=tuple(static_argnames),
        out_shardings=(None, out) if carry and out is not None else out,
      )

    @functools.wraps(fn)
    def call(*args, state=None, **static):
      with self.context():
        return jitted(self.state if state is None else state, *args, **static)

    def lower(*args, state=None, **static):
      """The program for these arguments (arrays or ShapeDtypeStructs), e.g. for
      `.compile().memory_analysis()`."""
      with self.context():
        return jitted.lower(self.state if state is None else state, *args, **static)

    call.lower = lower
    return call

  @property
  def config(self):
    """The model's `ModelConfig` (a static attribute of the graphdef; of several, the one with the
    largest vocabulary: a CODI backbone after its growth), or None if none is found."""
    found = [getattr(attr, "value", None) for _, attr in getattr(self.graphdef, "attributes", ())]
    cfgs = [c for c in found if isinstance(c, ModelConfig)]
    return max(cfgs, key=lambda c: c.vocab_size) if cfgs else None

  def put_batch(self, x) -> jax.Array:
    """A host batch -> an array split along the batch axes of this model's mesh."""
    with self.context():
      return sharding.put_batch(x)

  @property
  def compiles(self) -> int:
    """Traces of every function so far (each trace is one compile)."""
    return sum(self.traces.values())

  def compiles_of(self, name: str) -> int:
    return sum(n for (fn, _), n in self.traces.items() if fn == name)

  def retraced(self) -> list[tuple[str, Any]]:
    """(fn name, signature) pairs traced more than once: a shape bucket compiled twice."""
    return [key for key, n in self.traces.items() if n > 1]
