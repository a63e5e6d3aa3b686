"""Explicit KV cache: a pytree passed into the model and returned, never stored in it.

Keys and values of every layer live in one array each, [num_layers, B, T, K, Dh], in both
parameter layouts: a block writes its new slots at (layer, end) and reads its layer back, so the
scanned and the unrolled forward share one cache. All rows write at one shared slot index `end`; each row's positions and padding live in `pos`
(passed to the model) and `valid`, so left padding, right padding and per-row lengths all reduce
to the same mask `valid[b, t] & (t <= query slot)`.

The capacity T is a static shape. Length-aware decoding (`codi_jax.decoding`) starts small and
`grow`s the cache between jitted loop segments along `capacities`: a schedule of doubling buckets
from a minimum up to the budget, so a decode step attends over at most about twice the filled slots
and the cache holds at most about twice the longest row, with one compiled program per bucket.
"""
# pylint: disable=invalid-name

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from codi_jax.models.config import ModelConfig
from codi_jax.models.partitioning import constrain

_AXES = (None, "batch", "cache_len", "act_kv", None)  # logical axes of the k / v arrays


class KVCache(NamedTuple):
  k: jax.Array  # [num_layers, B, T, K, Dh]
  v: jax.Array  # [num_layers, B, T, K, Dh]
  valid: jax.Array  # [B, T] bool: slot holds a real (unmasked) token
  end: jax.Array  # [] int32: next slot to write

  @property
  def capacity(self) -> int:
    return self.valid.shape[1]

  @property
  def num_layers(self) -> int:
    return self.k.shape[0]


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=None) -> KVCache:
  """An empty cache of `capacity` slots per row."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
  k = constrain(jnp.zeros(shape, dtype), _AXES)
  v = constrain(jnp.zeros(shape, dtype), _AXES)  # two buffers: both donatable
  return KVCache(k, v, jnp.zeros((batch, capacity), bool), jnp.zeros((), jnp.int32))


def grow(cache: KVCache, capacity: int) -> KVCache:
  """The same cache with `capacity` slots: empty (invalid, zero) slots appended after the old ones.

  Every filled slot keeps its index, so `end`, positions and masks carry over unchanged.
  """
  T = cache.capacity
  if capacity < T:
    raise ValueError(f"a cache only grows: {capacity} < {T} slots")
  if capacity == T:
    return cache

  def pad(x, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, capacity - T)
    return jnp.pad(x, widths)

  k, v = (constrain(pad(x, 2), _AXES) for x in (cache.k, cache.v))
  return KVCache(k, v, pad(cache.valid, 1), cache.end)


def tile_rows(cache: KVCache, n: int) -> KVCache:
  """The batch repeated n times (rows b, B + b, ... are copies of row b), e.g. to run several
  candidate inputs from one cache in a single step."""
  k, v = (jnp.concatenate([x] * n, axis=1) for x in (cache.k, cache.v))
  return KVCache(k, v, jnp.concatenate([cache.valid] * n, axis=0), cache.end)


def take_rows(cache: KVCache, start: int, stop: int) -> KVCache:
  """Rows start..stop-1 of the batch (the inverse of `tile_rows` for one copy)."""
  return KVCache(cache.k[:, start:stop], cache.v[:, start:stop], cache.valid[start:stop], cache.end)


def capacities(used: int, total: int, min_capacity: int | None, chunk: int = 1) -> tuple[int, ...]:
  """The capacity buckets of one length-aware decode run, smallest first; the last is `total`.

  used: slots filled before the loop's first step; total: the fixed-capacity path's size (prompt
  plus budget). Buckets are min_capacity * 2^k (the first one leaves room for a `chunk` of steps),
  capped at total; a last doubling that would leave under a quarter of total to go jumps straight to
  total. min_capacity None or 0: one bucket, the fixed-capacity path. At most
  1 + ceil(log2(total / min_capacity)) buckets, so at most that many loop programs per run.
  """
  if not min_capacity or min_capacity >= total:
    return (total,)
  c = min_capacity
  while c < min(used + chunk, total):
    c *= 2
  out = [min(c, total)]
  while out[-1] < total:
    nxt = min(2 * out[-1], total)
    if 4 * total < 5 * nxt:  # what would be left after nxt is under a quarter of total
      nxt = total
    out.append(nxt)
  return tuple(out)


def write(
  all_NxBxTxKxDh: jax.Array, new_BxLxKxDh: jax.Array, layer: jax.Array | int, end: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Writes one layer's L new slots at `end` (in place under donation: only L slots move) and
  returns (every layer's array, this layer's [B, T, K, Dh] slice to attend over)."""
  new = new_BxLxKxDh.astype(all_NxBxTxKxDh.dtype)[None]
  zero = jnp.zeros((), jnp.int32)
  end, layer = jnp.asarray(end, jnp.int32), jnp.asarray(layer, jnp.int32)
  out = jax.lax.dynamic_update_slice(all_NxBxTxKxDh, new, (layer, zero, end, zero, zero))
  return out, jax.lax.dynamic_index_in_dim(out, layer, 0, keepdims=False)


def advance(cache: KVCache, k, v, mask_BxL: jax.Array) -> KVCache:
  """Records L new slots: the k/v arrays every layer wrote into and the input mask; moves `end`."""
  valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask_BxL, cache.end, axis=1)
  return KVCache(k, v, valid, cache.end + mask_BxL.shape[1])
