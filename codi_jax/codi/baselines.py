"""The baselines' losses on CODI's passes: Coconut (arXiv 2412.06769) and iCoT-SI (arXiv 2405.14838).

Both read batches whose content follows a curriculum built on the host
(codi_jax/data/curriculum.py); the losses here are pure functions of the batch, so each compiled
step serves every step of its stage (Coconut: one compile per thought count; iCoT-SI: one).

- Coconut: CODI's student path without the projection: [question][bot] encoded, N continuous
  thoughts (the last hidden state after the final norm fed back as the next input embedding),
  then [eot][remaining CoT steps][answer] teacher-forced on the cache; cross-entropy on the tokens
  after [eot]. Rows may run fewer thoughts than N (`num_thoughts` in the batch).
- iCoT-SI: plain next-token cross-entropy on [question][CoT][answer] with the first CoT tokens
  already cut out by the host, at the positions the host computed (`teacher_positions`).

Reference behaviours and our departures: docs/baselines.md, section 4.

Shape legend: B batch, L teacher length.
"""
# pylint: disable=invalid-name

from __future__ import annotations

from codi_jax.codi.model import (
  Codi,
  CodiOptions,
  Stream,
  next_token_ce,
  student_forward,
  teacher_ce,
)
from codi_jax.models.layers import fold


def coconut_loss(codi: Codi, batch, opts: CodiOptions, rng=None):
  """(loss, metrics): CE of the answer pass after `opts.num_latent` unprojected thoughts."""
  out = student_forward(
    codi, batch, opts, fold(rng, Stream.STUDENT), hidden_states=False, logits="none"
  )
  ce = next_token_ce(codi.backbone, out.hidden, batch["decoder_labels"], opts.ce_chunk_logits)
  return ce, {"ce_student": ce, "loss": ce}


def icot_loss(codi: Codi, batch, opts: CodiOptions, rng=None):
  """(loss, metrics): CE of the shortened teacher sequence at the batch's positions."""
  out = codi.backbone(
    batch["teacher_ids"],
    positions=batch["teacher_positions"],
    mask=batch["teacher_mask"],
    logits="none",
    rng=fold(rng, Stream.TEACHER),
    remat=opts.remat_teacher,
    remat_policy=opts.remat_policy,
  )
  ce = teacher_ce(codi.backbone, out.hidden, batch, opts.ce_chunk_logits)
  return ce, {"ce_teacher": ce, "loss": ce}
