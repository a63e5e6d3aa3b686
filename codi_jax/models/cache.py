"""Explicit KV cache: a pytree passed into the model and returned, never stored in it.

All rows write at one shared slot index `end`; each row's positions and padding live in `pos`
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

_AXES = ("batch", "cache_len", "act_kv", None)  # logical axes of each k / v array


class KVCache(NamedTuple):
  k: tuple[jax.Array, ...]  # num_layers x [B, T, K, Dh]
  v: tuple[jax.Array, ...]  # num_layers x [B, T, K, Dh]
  valid: jax.Array  # [B, T] bool: slot holds a real (unmasked) token
  end: jax.Array  # [] int32: next slot to write

  @property
  def capacity(self) -> int:
    return self.valid.shape[1]


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=None) -> KVCache:
  """An empty cache of `capacity` slots per row."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, capacity, cfg.num_kv_heads, cfg.head_dim)
  k = tuple(constrain(jnp.zeros(shape, dtype), _AXES) for _ in range(cfg.num_layers))
  v = tuple(constrain(jnp.zeros(shape, dtype), _AXES) for _ in range(cfg.num_layers))  # donatable
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

  def pad(x_BxTx):
    widths = [(0, 0)] * x_BxTx.ndim
    widths[1] = (0, capacity - T)
    return jnp.pad(x_BxTx, widths)

  k = tuple(constrain(pad(x), _AXES) for x in cache.k)
  v = tuple(constrain(pad(x), _AXES) for x in cache.v)
  return KVCache(k, v, pad(cache.valid), cache.end)


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


def write(cache_BxTxKxDh: jax.Array, new_BxLxKxDh: jax.Array, end: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(
    cache_BxTxKxDh, new_BxLxKxDh.astype(cache_BxTxKxDh.dtype), end, axis=1
  )


def advance(cache: KVCache, k, v, mask_BxL: jax.Array) -> KVCache:
  """Records L new slots: new per-layer k/v tuples and the input mask; moves `end` by L."""
  valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask_BxL, cache.end, axis=1)
  return KVCache(tuple(k), tuple(v), valid, cache.end + mask_BxL.shape[1])
