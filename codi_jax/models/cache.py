"""Explicit, fixed-capacity KV cache: a pytree passed into the model and returned, never stored in it.

All rows write at one shared slot index `end`; each row's positions and padding live in `pos`
(passed to the model) and `valid`, so left padding, right padding and per-row lengths all reduce
to the same mask `valid[b, t] & (t <= query slot)`.
"""
# pylint: disable=invalid-name

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from codi_jax.models.config import ModelConfig
from codi_jax.models.partitioning import constrain


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
  axes = ("batch", "cache_len", "act_kv", None)
  k = tuple(constrain(jnp.zeros(shape, dtype), axes) for _ in range(cfg.num_layers))
  v = tuple(
    constrain(jnp.zeros(shape, dtype), axes) for _ in range(cfg.num_layers)
  )  # distinct: donatable
  return KVCache(k, v, jnp.zeros((batch, capacity), bool), jnp.zeros((), jnp.int32))


def write(cache_BxTxKxDh: jax.Array, new_BxLxKxDh: jax.Array, end: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(
    cache_BxTxKxDh, new_BxLxKxDh.astype(cache_BxTxKxDh.dtype), end, axis=1
  )


def advance(cache: KVCache, k, v, mask_BxL: jax.Array) -> KVCache:
  """Records L new slots: new per-layer k/v tuples and the input mask; moves `end` by L."""
  valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask_BxL, cache.end, axis=1)
  return KVCache(tuple(k), tuple(v), valid, cache.end + mask_BxL.shape[1])
