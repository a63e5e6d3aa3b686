"""Logical axis names -> mesh partition specs, and activation sharding hints for model code.

Model code names axes logically (`batch`, `embed`, `heads`, `kv`, `mlp`, `vocab` for parameters;
`act_*` and `cache_len` for activations) and calls `constrain`, which is a no-op unless it is traced
inside an entry point's mesh context (`codi_jax.sharding.use_mesh`: `jax.set_mesh` plus flax's
logical-axis rules). The rules are data from the caller's config; model code never reads a config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec

Rules = Mapping[str, tuple[str, ...]]  # logical name -> mesh axes (empty: replicated)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh, rules: Rules) -> PartitionSpec:
  """The PartitionSpec of an array with these logical axes and shape on `mesh` (or abstract mesh).

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


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """A sharding hint for an activation with these logical axes (no-op outside a mesh context)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  rules = {name: tuple(a) for name, a in flax_spmd.get_logical_axis_rules()}
  return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, mesh, rules))
