"""Logical axis names -> mesh partition specs, and activation sharding hints for model code.

Model code names axes logically (`batch`, `embed`, `heads`, `kv`, `mlp`, `vocab` for parameters;
`act_*` and `cache_len` for activations) and calls `constrain`, which is a no-op unless the caller
traces it inside `activation_rules(mesh, rules)`. The rules are data from the caller's config;
model code never reads them itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Mapping[str, tuple[str, ...]]  # logical name -> mesh axes (empty: replicated)

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("codi_jax_activation_rules", default=None)


def spec_for(
  axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> PartitionSpec:
  """The PartitionSpec of an array with these logical axes and shape.

  Mesh axes of size 1 are dropped; a mesh axis already used by an earlier dimension is not reused;
  trailing mesh axes are dropped until the dimension divides evenly (e.g. a 303-row vocabulary on a
  2-way tensor axis stays replicated rather than padded).
  """
  used, out = set(), []
  for name, dim in zip(tuple(axes) + (None,) * (len(shape) - len(axes)), shape):
    cand = [a for a in (rules.get(name, ()) if name else ()) if mesh.shape[a] > 1 and a not in used]
    while cand and dim % math.prod(mesh.shape[a] for a in cand):
      cand.pop()
    used.update(cand)
    out.append(None if not cand else cand[0] if len(cand) == 1 else tuple(cand))
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules):
  """Makes `constrain` place activations on `mesh` by `rules` while tracing inside the block."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """A sharding hint for an activation with these logical axes (no-op outside `activation_rules`)."""
  ctx = _ACTIVE.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(
    x, NamedSharding(mesh, spec_for(axes, x.shape, mesh, rules))
  )
