"""The two layouts of the blocks' parameters, and the one per-layer view that import/export use.

Unrolled (`scan_layers=False`): `blocks` is a list, paths `blocks.<i>.<module>.<leaf>`.
Stacked (`scan_layers=True`): `blocks` is one block whose parameters carry a leading layer axis
(logical axis "layers"), paths `blocks.<module>.<leaf>`, so one `lax.scan` runs every layer and
compile time no longer grows with depth. Checkpoint formats name layers one by one, so readers and
writers go through `per_layer` (stacked -> unrolled paths) and `stacked_value` (the inverse).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYER_AXIS = "layers"  # logical name of the leading axis of stacked block parameters


def stack(blocks: Sequence[nnx.Module]) -> nnx.Module:
  """One module holding `blocks`' parameters stacked on a leading "layers" axis (same values)."""
  graphdef, _ = nnx.split(blocks[0])
  states = [nnx.state(b) for b in blocks]

  def one(*vs: nnx.Variable) -> nnx.Variable:
    axes = tuple(vs[0].get_metadata().get("out_sharding") or ())
    value = jnp.stack([v.get_value() for v in vs])
    return vs[0].replace(value, out_sharding=(LAYER_AXIS,) + axes)

  stacked = jax.tree.map(one, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, stacked)


def _blocks_at(path: Sequence) -> int | None:
  """The index of a stacked `blocks` entry in a flat-state path (a model's own, or one nested in a
  wrapper such as `backbone.blocks...`), or None: stacked means no layer index follows it."""
  for j, part in enumerate(path[:-1]):
    if part == "blocks":
      return None if isinstance(path[j + 1], int) else j
  return None


def is_stacked(path: Sequence) -> bool:
  """A flat-state path of a stacked block parameter (`...blocks.<module>...`, no layer index)."""
  return _blocks_at(path) is not None


def per_layer(flat: Sequence[tuple[tuple, object]]) -> Iterator[tuple[tuple, object]]:
  """(path, value) pairs with stacked entries split into one unrolled `...blocks.<i>...` pair per
  layer; values are whatever `flat` holds (arrays, or Variables whose value is indexed)."""
  for path, v in flat:
    path, j = tuple(path), _blocks_at(path)
    if j is None:
      yield path, v
      continue
    value = v.get_value() if isinstance(v, nnx.Variable) else v
    for i in range(value.shape[0]):
      yield path[: j + 1] + (i,) + path[j + 1 :], value[i]


def stacked_value(path: Sequence, num_layers: int, get: Callable[[tuple], np.ndarray]):
  """The value of flat-state `path` in the model's own layout from per-layer values `get(unrolled
  path)`: stacked paths gather every layer and stack them (in numpy: one copy)."""
  path, j = tuple(path), _blocks_at(path)
  if j is None:
    return get(path)
  layers = [np.asarray(get(path[: j + 1] + (i,) + path[j + 1 :])) for i in range(num_layers)]
  return np.stack(layers)
