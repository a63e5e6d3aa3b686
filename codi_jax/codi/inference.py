"""CODI inference: batched, jitted answer decoding for the student (N continuous thoughts, then
greedy after [eot]) and for the teacher (greedy CoT + answer from the question).

Shape legend: B batch, Lq question length, N new tokens.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import jax.numpy as jnp

from codi_jax.codi.model import Codi, encode_and_think
from codi_jax.decoding import greedy_loop, prefill
from codi_jax.models.step import step


def student_generate(
  codi: Codi,
  enc_ids_BxLq,
  enc_mask_BxLq,
  *,
  eot_id: int,
  max_new: int,
  eos_ids,
  pad_id: int,
  suppress=(),
):
  """[question][bot] -> N thoughts -> [eot] -> greedy answer. Returns (tokens [B, N], lengths [B])."""
  batch = {"encoder_ids": enc_ids_BxLq, "encoder_mask": enc_mask_BxLq}
  codi.sync_special_rows()
  cache, pos, _ = encode_and_think(codi, batch, capacity_extra=max_new + 1)
  bb = codi.backbone
  B = enc_ids_BxLq.shape[0]
  eot = bb.embed_tokens(jnp.full((B, 1), eot_id, jnp.int32))
  out = step(bb, eot, pos[:, None], cache)
  return greedy_loop(
    bb, out.logits, out.cache, pos + 1, max_new, jnp.asarray(eos_ids, jnp.int32), pad_id, suppress
  )


def teacher_generate(
  codi: Codi, q_ids_BxLq, q_mask_BxLq, *, max_new: int, eos_ids, pad_id: int, suppress=()
):
  """Explicit CoT decoding from the question alone (the teacher / CoT-SFT mode)."""
  bb = codi.sync_special_rows().backbone
  B, Lq = q_ids_BxLq.shape
  pos = None if codi.cfg.padding_mode == "masked" else jnp.broadcast_to(jnp.arange(Lq), (B, Lq))
  logits, cache, next_pos = prefill(bb, q_ids_BxLq, q_mask_BxLq, Lq + max_new, pos)
  return greedy_loop(
    bb, logits, cache, next_pos, max_new, jnp.asarray(eos_ids, jnp.int32), pad_id, suppress
  )
