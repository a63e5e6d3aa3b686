"""Dropout keep masks from 16-bit draws: four elements per threefry hash instead of one.

`jax.random.bernoulli` draws a 32-bit uniform per element, and with `jax_threefry_partitionable`
(jax's default) each 32-bit draw costs a whole threefry2x32 hash (64 bits, XORed to 32). On CPU the
hashes were ~20-30% of a small CODI training step. Here every hash's 64 bits give four 16-bit draws,
so a mask costs a quarter of the hashes; the drop probability is `round(65536 * rate) / 65536`
(0.1 -> 0.1000061). Counters are shaped like the mask, as jax's partitionable threefry, so a sharded
activation draws only its own shard. Keys of other PRNG implementations fall back to bernoulli.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.random import threefry2x32_p

RESOLUTION = 1 << 16  # drop probabilities are multiples of 1 / RESOLUTION
_PER_HASH = 4  # 16-bit draws per threefry2x32 hash (two 32-bit words)


def _threefry_data(rng: jax.Array) -> jax.Array | None:
  """The key's two uint32 words if it is a threefry2x32 key (typed or raw), else None."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(rng)) != "threefry2x32":
      return None
    return jax.random.key_data(rng)
  return rng if rng.shape == (2,) and rng.dtype == jnp.uint32 else None


def uniform16(data_2: jax.Array, shape: tuple[int, ...], threshold: int | None = None):
  """uint32 [*shape] uniform in [0, 65536) from threefry key words `data_2`, four per hash (hash
  counters: the flat index over [*shape[:-1], ceil(shape[-1] / 4)]); with `threshold`, the bool
  `draw >= threshold` instead (compared before the four are interleaved: a stored mask is bool)."""
  *lead, last = shape
  groups_shape = (*lead, -(-last // _PER_HASH))
  strides = [math.prod(groups_shape[d + 1 :]) for d in range(len(groups_shape))]
  counter = sum(
    lax.broadcasted_iota(jnp.uint32, groups_shape, d) * jnp.uint32(s) for d, s in enumerate(strides)
  )
  hi, lo = threefry2x32_p.bind(data_2[0], data_2[1], jnp.zeros_like(counter), counter)
  mask16 = jnp.uint32(0xFFFF)
  draws = [hi & mask16, hi >> 16, lo & mask16, lo >> 16]
  if threshold is not None:
    draws = [d >= jnp.uint32(threshold) for d in draws]
  stacked = jnp.stack(draws, axis=-1)
  return stacked.reshape(*lead, groups_shape[-1] * _PER_HASH)[..., :last]


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """bool [*shape], True with probability 1 - round(65536 * rate) / 65536, independently."""
  data = _threefry_data(rng)
  if data is None or not shape or math.prod(shape) >= 2**32:
    return jax.random.bernoulli(rng, 1.0 - rate, shape)
  return uniform16(data, tuple(shape), round(rate * RESOLUTION))
