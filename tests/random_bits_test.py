"""Dropout keep masks from 16-bit draws: statistics, determinism, a quarter of the hashes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.models import random_bits
from codi_jax.models.layers import dropout


def _drawn(fn, *args) -> dict:
  """Elements per random primitive in fn's jaxpr: threefry2x32 hashes, random_bits 32-bit draws
  (one threefry hash each under jax_threefry_partitionable, jax's default)."""
  counts = {"threefry2x32": 0, "random_bits": 0}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in counts:
        counts[eqn.primitive.name] += int(np.prod(eqn.outvars[0].aval.shape))
      for p in eqn.params.values():
        if hasattr(p, "jaxpr"):  # a closed sub-jaxpr (jit)
          walk(p.jaxpr)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return counts


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_rate_and_independence(rate):
  shape = (64, 37, 211)  # last axis not a multiple of 4
  keep = np.asarray(random_bits.keep_mask(jax.random.key(0), rate, shape))
  assert keep.shape == shape and keep.dtype == bool
  n, p = keep.size, 1 - round(rate * 65536) / 65536
  assert abs(keep.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
  # The four draws of one hash sit side by side on the last axis: neighbours are uncorrelated,
  # within a hash (j, j + 1) and across hashes and rows.
  x = keep.astype(np.float64)
  for a, b in ((x[..., :-1], x[..., 1:]), (x[..., :-4], x[..., 4:]), (x[:-1], x[1:])):
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 5 / np.sqrt(a.size)


def test_draws_are_uniform_16_bit():
  draws = np.asarray(random_bits.uniform16(jax.random.key_data(jax.random.key(3)), (512, 1024)))
  assert draws.min() == 0 and draws.max() == 65535
  counts = np.bincount(draws.ravel() >> 12, minlength=16)  # 16 equal bins
  expected = draws.size / 16
  assert ((counts - expected) ** 2 / expected).sum() < 60  # chi-square, 15 dof: p ~ 1e-7


def test_deterministic_per_key_and_differs_across_keys():
  k = jax.random.key(5)
  a = random_bits.keep_mask(k, 0.1, (8, 33))
  np.testing.assert_array_equal(a, random_bits.keep_mask(k, 0.1, (8, 33)))
  assert not np.array_equal(a, random_bits.keep_mask(jax.random.fold_in(k, 1), 0.1, (8, 33)))
  raw = random_bits.keep_mask(jax.random.key_data(k), 0.1, (8, 33))  # a raw uint32[2] key
  np.testing.assert_array_equal(a, raw)


def test_quarter_of_the_hashes():
  shape = (8, 94, 130)
  k = jax.random.key(0)
  ours = _drawn(lambda k: random_bits.keep_mask(k, 0.1, shape), k)
  assert ours == {"threefry2x32": 8 * 94 * 33, "random_bits": 0}  # 130 -> 33 hashes of 4 draws
  theirs = _drawn(lambda k: jax.random.bernoulli(k, 0.9, shape), k)
  assert theirs["random_bits"] >= 8 * 94 * 130


def test_other_key_impls_and_scalars_fall_back_to_bernoulli():
  k = jax.random.key(1, impl="rbg")
  np.testing.assert_array_equal(
    random_bits.keep_mask(k, 0.3, (4, 5)), jax.random.bernoulli(k, 0.7, (4, 5))
  )
  assert random_bits.keep_mask(jax.random.key(1), 0.3, ()).shape == ()


def test_dropout_scales_kept_values():
  x = jnp.ones((256, 256))
  y = np.asarray(dropout(x, 0.25, jax.random.key(2)))
  assert set(np.unique(y).tolist()) <= {0.0, float(np.float32(1 / 0.75))}
  assert abs(y.mean() - 1.0) < 0.02
  np.testing.assert_array_equal(dropout(x, 0.25, None), x)
