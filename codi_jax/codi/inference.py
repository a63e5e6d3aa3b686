"""CODI inference: batched, jitted answer decoding for the student (N continuous thoughts, then
greedy after [eot]) and for the teacher (greedy CoT + answer from the question).

`student_generate` / `teacher_generate` decode in a fixed-capacity cache (question + thoughts +
max_new). `student_start` / `teacher_start` with `decoding.greedy_resume` are the same decoding
split into length-aware segments (`codi_jax.decoding.Segmented`, as `CodiDecoder` runs it): the
cache starts at a small capacity bucket and grows with the answer, with the same tokens.

Shape legend: B batch, Lq question length, N new tokens.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import jax.numpy as jnp

from codi_jax.codi.model import Codi, encode_and_think
from codi_jax.decoding import greedy_init, greedy_segment, prefill
from codi_jax.models import cache as kvc
from codi_jax.models.positions import PaddingMode
from codi_jax.models.step import step


def student_capacities(
  question_len: int, num_latent: int, max_new: int, min_capacity: int | None
) -> tuple[int, ...]:
  """Cache buckets of one student run: question + thoughts + [eot] fill the cache before the
  answer loop; the fixed path holds max_new more slots."""
  used = question_len + num_latent + 1
  return kvc.capacities(used, used + max_new, min_capacity)


def teacher_capacities(question_len: int, max_new: int, min_capacity: int | None):
  """Cache buckets of one teacher run (question, then max_new tokens)."""
  return kvc.capacities(question_len, question_len + max_new, min_capacity)


def student_start(
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
  capacity: int,
  last: bool,
):
  """[question][bot] -> N thoughts -> [eot] -> the first greedy segment in a `capacity`-slot cache
  (`decoding.run_segment`'s result; loop state (tokens [B, N], done, lengths [B]))."""
  batch = {"encoder_ids": enc_ids_BxLq, "encoder_mask": enc_mask_BxLq}
  B, Lq = enc_ids_BxLq.shape
  cache, pos, _ = encode_and_think(
    codi,
    batch,
    num_latent=num_latent,
    padding_mode=padding_mode,
    capacity_extra=capacity - Lq - num_latent,
  )
  backbone = codi.backbone
  eot = backbone.embed_tokens(jnp.full((B, 1), eot_id, jnp.int32))
  out = step(backbone, eot, pos[:, None], cache)
  eos = jnp.asarray(eos_ids, jnp.int32)
  carry = greedy_init(backbone, out.logits, out.cache, pos + 1, max_new, eos, pad_id, suppress)
  return greedy_segment(backbone, carry, max_new, eos, pad_id, suppress, last=last)


def teacher_start(
  codi: Codi,
  q_ids_BxLq,
  q_mask_BxLq,
  *,
  padding_mode: PaddingMode = "masked",
  max_new: int,
  eos_ids,
  pad_id: int,
  suppress=(),
  capacity: int,
  last: bool,
):
  """Prefill of the question, then the first greedy segment in a `capacity`-slot cache."""
  backbone = codi.backbone
  logits, cache, next_pos = prefill(backbone, q_ids_BxLq, q_mask_BxLq, capacity, padding_mode)
  eos = jnp.asarray(eos_ids, jnp.int32)
  carry = greedy_init(backbone, logits, cache, next_pos, max_new, eos, pad_id, suppress)
  return greedy_segment(backbone, carry, max_new, eos, pad_id, suppress, last=last)


def student_generate(
  codi: Codi, enc_ids_BxLq, enc_mask_BxLq, *, num_latent: int, max_new: int, **options
):
  """[question][bot] -> N thoughts -> [eot] -> greedy answer. Returns (tokens [B, N], lengths [B]).

  options: `student_start`'s eot_id, eos_ids, pad_id, padding_mode and suppress; the cache holds
  exactly question + thoughts + eot + answer.
  """
  capacity = enc_ids_BxLq.shape[1] + num_latent + max_new + 1
  _, ((buf, _, n), _) = student_start(
    codi,
    enc_ids_BxLq,
    enc_mask_BxLq,
    num_latent=num_latent,
    max_new=max_new,
    capacity=capacity,
    last=True,
    **options,
  )
  return buf, n


def teacher_generate(codi: Codi, q_ids_BxLq, q_mask_BxLq, *, max_new: int, **options):
  """Explicit CoT decoding from the question alone (the teacher / CoT-SFT mode).

  options: `teacher_start`'s eos_ids, pad_id, padding_mode and suppress.
  """
  capacity = q_ids_BxLq.shape[1] + max_new
  _, ((buf, _, n), _) = teacher_start(
    codi, q_ids_BxLq, q_mask_BxLq, max_new=max_new, capacity=capacity, last=True, **options
  )
  return buf, n
