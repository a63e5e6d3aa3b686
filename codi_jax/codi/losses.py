"""Each training method's loss: CODI's family in model.py, the baselines' in baselines.py.

Above both modules, so neither imports the other to dispatch; the training step calls `loss`.
"""

from __future__ import annotations

from codi_jax.codi import baselines
from codi_jax.codi.model import Codi, CodiOptions, codi_loss

LOSSES = {
  "codi": codi_loss,
  "cot_sft": codi_loss,
  "no_cot_sft": codi_loss,
  "coconut": baselines.coconut_loss,
  "icot_si": baselines.icot_loss,
}


def loss(codi: Codi, batch, opts: CodiOptions, rng=None):
  """(loss, metrics) of `opts.method` on `batch` (the function in `LOSSES`)."""
  return LOSSES[opts.method](codi, batch, opts, rng)
