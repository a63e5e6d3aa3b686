"""Device meshes and shardings from config: named axes, logical-axis rules as data, placement.

The mesh has three named axes: `data` (pure data parallelism), `fsdp` (data parallelism with
parameters and optimizer state sharded along their `embed` axis) and `tensor` (heads, kv heads,
MLP width and vocabulary split across devices). `config.mesh` gives their sizes, one of them -1
(inferred from the device count); `config.logical_axis_rules` maps the model's logical axis names
to mesh axes. The mesh is Auto (GSPMD propagates shardings from inputs, parameters and the hints
of `models.partitioning.constrain`).

Each entry point enters `use_mesh(mesh, rules)` once; the functions below read the active mesh and
rules from that context (`current()`), so no signature below an entry point carries them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from codi_jax.config_rules import Custom, is_int
from codi_jax.errors import InputError
from codi_jax.models.layout import LAYER_AXIS
from codi_jax.models.partitioning import Rules, spec_for
from codi_jax.options import option

MESH_AXES = ("data", "fsdp", "tensor")

# The library's fallback when an entry point's config gives no rules (e.g. soft decoding without
# --config). Training configs carry their own commented copy (configs/base.py; a test keeps the two
# equal). Parameters: FSDP along `embed`, tensor parallelism along head/MLP/vocab axes; activations:
# batch over both data axes, the residual stream replicated over `tensor`.
DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("embed", ("fsdp",)),
  ("heads", ("tensor",)),
  ("kv", ("tensor",)),
  ("mlp", ("tensor",)),
  ("vocab", ("tensor",)),
  ("layers", ()),
  ("act_heads", ("tensor",)),
  ("act_kv", ("tensor",)),
  ("act_mlp", ("tensor",)),
  ("act_vocab", ("tensor",)),
  ("act_embed", ()),
  ("cache_len", ()),
)


def mesh_shape(
  sizes: Mapping[str, int], num_devices: int, *, where: str = "--config.mesh"
) -> tuple[int, ...]:
  """(data, fsdp, tensor) sizes with the one -1 inferred; InputError if they don't fit the devices."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise InputError(f"{where}: unknown mesh axes {unknown} (axes: {', '.join(MESH_AXES)})")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in shape):
    raise InputError(
      f"{where}: sizes {dict(zip(MESH_AXES, shape))} need positive values and at most one -1"
    )
  known = math.prod(s for s in shape if s != -1)
  if free:
    if num_devices % known:
      raise InputError(
        f"{where}: {dict(zip(MESH_AXES, shape))} does not divide the {num_devices} devices"
      )
    shape[free[0]] = num_devices // known
  if math.prod(shape) != num_devices:
    raise InputError(
      f"{where}: {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} devices, "
      f"{num_devices} are available"
    )
  return tuple(shape)


def make_mesh(
  sizes: Mapping[str, int],
  devices: Sequence[jax.Device] | None = None,
  *,
  where: str = "--config.mesh",
) -> Mesh:
  """An Auto-mode mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices), where=where)
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def rules_from_config(
  rules: Iterable, *, where: str = "--config.logical_axis_rules"
) -> dict[str, tuple[str, ...]]:
  """[(logical, mesh axis | (mesh axes) | None), ...] -> {logical: (mesh axes)}; checks the names."""
  out = {}
  for entry in rules:
    if len(entry) != 2:
      raise InputError(f"{where}: {entry!r} is not a (logical axis, mesh axes) pair")
    name, target = entry
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise InputError(
        f"{where}: {name!r} maps to unknown mesh axes {bad} (axes: {', '.join(MESH_AXES)})"
      )
    out[str(name)] = axes
  return out


def _axis_rules_ok(v) -> bool:
  if not isinstance(v, list | tuple):
    return False
  try:
    rules_from_config(v)
  except InputError:
    return False
  return all(isinstance(e, list | tuple) and isinstance(e[0], str) for e in v)


def mesh_size_ok(v) -> bool:
  return is_int(v) and (v == -1 or 1 <= v <= 1 << 20)


AXIS_RULES = Custom(
  _axis_rules_ok,
  "a list of (logical axis, mesh axes) pairs over the mesh axes data, fsdp, tensor",
  doc="logical axis -> mesh axes (configs/base.py explains each name)",
)
_MESH_SIZE = Custom(mesh_size_ok, "-1 (the remaining devices) or an integer >= 1")


@dataclasses.dataclass(frozen=True)
class MeshOptions:
  """`config.mesh`: devices per mesh axis (-1: the remaining devices)."""

  data: int = option(dataclasses.replace(_MESH_SIZE, doc="data-parallel replicas"))
  fsdp: int = option(dataclasses.replace(_MESH_SIZE, doc="parameter shards (FSDP)"))
  tensor: int = option(dataclasses.replace(_MESH_SIZE, doc="tensor-parallel shards"))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Rules | Iterable | None = None):
  """The one mesh + logical-axis-rules context of an entry point (`jax.set_mesh` and flax's
  `nnx.logical_axis_rules`); everything below reads them with `current()`. No-op without a mesh."""
  if mesh is None:
    yield
    return
  rules = DEFAULT_RULES if rules is None else rules
  rules = rules if isinstance(rules, Mapping) else rules_from_config(rules)
  rules = {LAYER_AXIS: (), **rules}  # stacked blocks' layer axis, unless a table maps it
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules.items())):
    yield


def current() -> tuple[Mesh | None, dict[str, tuple[str, ...]]]:
  """(mesh, rules) of the active `use_mesh` context; (None, {}) outside one."""
  mesh = jax.sharding.get_mesh()
  if mesh.empty:
    return None, {}
  return mesh, {name: tuple(axes) for name, axes in flax_spmd.get_logical_axis_rules()}


def _active() -> tuple[Mesh, dict[str, tuple[str, ...]]]:
  mesh, rules = current()
  if mesh is None:
    raise ValueError("no active mesh: call inside `sharding.use_mesh(mesh, rules)`")
  return mesh, rules


def replicated() -> NamedSharding:
  return NamedSharding(_active()[0], PartitionSpec())


def batch_sharding(shape: Sequence[int]) -> NamedSharding:
  """Leading axis over the batch mesh axes (if it divides), the rest replicated."""
  mesh, rules = _active()
  return NamedSharding(mesh, spec_for(("batch",), shape, mesh, rules))


def batch_axes_size() -> int:
  """How many ways the batch axis is split (the global batch must be a multiple of it); 1 without
  a mesh."""
  mesh, rules = current()
  return 1 if mesh is None else math.prod(mesh.shape[a] for a in rules.get("batch", ()))


def state_shardings(state: Any) -> Any:
  """NamedShardings for an nnx.State (or abstract state) from each Variable's logical axes."""
  mesh, rules = _active()

  def one(v):
    value = v.get_value()
    axes = v.get_metadata().get("out_sharding") or ()
    return v.replace(NamedSharding(mesh, spec_for(axes, value.shape, mesh, rules)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any) -> Any:
  """Optimizer-state shardings: parameter-shaped leaves (Adam moments) follow their parameter,
  everything else (counts, MultiSteps bookkeeping) is replicated."""
  abstract = jax.eval_shape(tx.init, params)
  repl = replicated()
  out = []

  def trace():  # traced, never run: the mesh's devices may not be this host's (a TPU topology)
    out.append(
      optax.tree_map_params(
        tx,
        lambda _, sh: sh,
        abstract,
        param_shardings,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
      )
    )

  jax.eval_shape(trace)
  return out[0]


def place(tree: Any, shardings: Any) -> Any:
  """Host (or single-device) values -> global arrays with `shardings`; every process passes the
  same values and each device receives only its own shard."""

  def one(x, sh):
    if sh.is_fully_addressable:
      return jax.device_put(x, sh)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])

  return jax.tree.map(one, tree, shardings)


def shard_state(state: Any) -> Any:
  """An nnx.State placed by its logical axes on the active mesh (unchanged without one)."""
  return state if current()[0] is None else place(state, state_shardings(state))


def global_batch(local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays split along the batch mesh axes."""
  out = {}
  for k, v in local.items():
    shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(batch_sharding(shape), v, shape)
  return out


def describe(state: Any, shardings: Any) -> list[str]:
  """One line per parameter: path, shape, dtype, partition spec."""
  lines = []
  flat_sh = dict(nnx.to_flat_state(shardings))
  for path, v in nnx.to_flat_state(state):
    value, sh = v.get_value(), flat_sh[path].get_value()
    lines.append(f"{'.'.join(map(str, path))} {tuple(value.shape)} {value.dtype} {sh.spec}")
  return lines


def put_batch(x) -> jax.Array:
  """A host batch (the same on every process) -> one array split along the batch mesh axes."""
  if current()[0] is None:
    return jax.numpy.asarray(x)
  x = np.asarray(x)
  return place(x, batch_sharding(x.shape))


def replicate_out() -> NamedSharding | None:
  """out_shardings for small results every process reads (None without a mesh: jit decides)."""
  return None if current()[0] is None else replicated()
