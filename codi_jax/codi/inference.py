"""CODI inference: batched, jitted answer decoding for the student (N continuous thoughts, then
greedy after [eot]) and for the teacher (greedy CoT + answer from the question).

Shape legend: B batch, Lq question length, N new tokens.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import jax.numpy as jnp

from codi_jax.codi.model import Codi, encode_and_think
from codi_jax.decoding import PaddingMode, greedy_loop, prefill
from codi_jax.models.step import step


def student_generate(
  codi: Codi,
  enc_ids_BxLq,
  enc_mask_BxLq,
  *,
  num_latent: int,
  padding_mode: PaddingMode = "masked",
  eot_id: int,
  max_new: int,
  eos_ids,
  pad_id: int,
  suppress=(),
):
  """[question][bot] -> N thoughts -> [eot] -> greedy answer. Returns (tokens [B, N], lengths [B])."""
  batch = {"encoder_ids": enc_ids_BxLq, "encoder_mask": enc_mask_BxLq}
  cache, pos, _ = encode_and_think(
    codi, batch, num_latent=num_latent, padding_mode=padding_mode, capacity_extra=max_new + 1
  )
  backbone = codi.backbone
  B = enc_ids_BxLq.shape[0]
  eot = backbone.embed_tokens(jnp.full((B, 1), eot_id, jnp.int32))
  out = step(backbone, eot, pos[:, None], cache)
  eos = jnp.asarray(eos_ids, jnp.int32)
  return greedy_loop(backbone, out.logits, out.cache, pos + 1, max_new, eos, pad_id, suppress)


def teacher_generate(
  codi: Codi,
  q_ids_BxLq,
  q_mask_BxLq,
  *,
  padding_mode: PaddingMode = "masked",
  max_new: int,
  eos_ids,
  pad_id: int,
  suppress=(),
):
  """Explicit CoT decoding from the question alone (the teacher / CoT-SFT mode)."""
  backbone = codi.backbone
  Lq = q_ids_BxLq.shape[1]
  logits, cache, next_pos = prefill(backbone, q_ids_BxLq, q_mask_BxLq, Lq + max_new, padding_mode)
  eos = jnp.asarray(eos_ids, jnp.int32)
  return greedy_loop(backbone, logits, cache, next_pos, max_new, eos, pad_id, suppress)
