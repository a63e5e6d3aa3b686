"""The method -> loss table (codi_jax/codi/losses.py): every method has its loss, each dispatches
to its own function, and `codi_loss` refuses the baselines it no longer dispatches."""
# pylint: disable=invalid-name

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_codi
from flax import nnx

from codi_jax.codi import baselines, losses
from codi_jax.codi.model import METHODS, Codi, CodiOptions, codi_loss
from codi_jax.models import config as mcfg
from codi_jax.models import transformer

V = 40


def _batch():
  b = tiny_codi.loss_batch(np.random.default_rng(0), V, [5, 5, 4], [12, 9, 10], [8, 6, 7])
  b["teacher_positions"] = np.broadcast_to(np.arange(12), (3, 12))
  return {k: jnp.asarray(v) for k, v in b.items()}


def test_every_method_has_a_loss():
  assert tuple(losses.LOSSES) == METHODS


@pytest.mark.parametrize(
  "method,fn",
  [
    ("codi", codi_loss),
    ("cot_sft", codi_loss),
    ("no_cot_sft", codi_loss),
    ("coconut", baselines.coconut_loss),
    ("icot_si", baselines.icot_loss),
  ],
)
def test_loss_is_the_methods_own(method, fn):
  codi = Codi(transformer.build(mcfg.tiny("gpt2", vocab_size=V), seed=1), rngs=nnx.Rngs(0))
  opts = CodiOptions(method=method, num_latent=2, use_prj=method != "coconut")
  batch = _batch()
  got, got_m = losses.loss(codi, batch, opts)
  want, want_m = fn(codi, batch, opts)
  assert float(got) == float(want) and np.isfinite(float(got))
  assert sorted(got_m) == sorted(want_m)


@pytest.mark.parametrize("method", ["coconut", "icot_si"])
def test_codi_loss_refuses_the_baselines(method):
  codi = Codi(transformer.build(mcfg.tiny("gpt2", vocab_size=V), seed=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="losses.loss"):
    codi_loss(codi, _batch(), CodiOptions(method=method, num_latent=2))
