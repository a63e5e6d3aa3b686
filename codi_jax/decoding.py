"""Batched greedy decoding on the shared step: prefill once, then a jitted loop over the cache.

Prompts are left-padded to a length bucket, so every row's last prompt token sits at the same slot
and one compile serves every prompt batch of that (batch, bucket, max_new_tokens) shape.

Shape legend: B batch, P padded prompt length, N new tokens, V vocab, E stop ids.
"""
# pylint: disable=invalid-name

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from codi_jax.batching import bucket_size, left_pad
from codi_jax.models import cache as kvc
from codi_jax.models.jitted import JittedModel
from codi_jax.models.step import Carry, StepOut, while_steps
from codi_jax.models.transformer import Transformer

PaddingMode = Literal["masked", "official", "official_fixmask"]


def positions(mask_BxL: jax.Array, mode: PaddingMode = "masked") -> jax.Array:
  """Position ids of a left-padded block: counted from each row's first real token ("masked",
  pads get 0), or the slot index as the reference CODI code does ("official*": pads count)."""
  if mode == "masked":
    return jnp.maximum(jnp.cumsum(mask_BxL, axis=1) - 1, 0).astype(jnp.int32)
  B, L = mask_BxL.shape
  return jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))


def prefill(model: Transformer, ids_BxP, mask_BxP, capacity: int, mode: PaddingMode = "masked"):
  """Runs the prompt into a fresh cache; returns (last-position logits [B, V], cache, next pos [B])."""
  B, _ = ids_BxP.shape
  pos = positions(mask_BxP, mode)
  out = model(
    ids_BxP,
    positions=pos,
    mask=mask_BxP,
    cache=kvc.init_cache(model.cfg, B, capacity),
    logits="last",
  )
  return out.logits, out.cache, pos[:, -1] + 1


def greedy_loop(
  model: Transformer, logits_BxV, cache, pos_B, max_new: int, eos_E, pad_id: int, suppress=()
):
  """Greedy continuation from prefill logits: tokens [B, N] (pad after a row's stop) and lengths [B].

  `suppress` lists token ids that are never emitted (e.g. CODI's pad/bot/eot).
  """
  B = logits_BxV.shape[0]
  banned = jnp.zeros((logits_BxV.shape[-1],), bool).at[jnp.asarray(suppress, jnp.int32)].set(True)

  def pick(logits):
    return jnp.argmax(jnp.where(banned, -jnp.inf, logits), -1).astype(jnp.int32)

  tok0 = pick(logits_BxV)
  buf = jnp.full((B, max_new), pad_id, jnp.int32).at[:, 0].set(tok0)
  done = jnp.isin(tok0, eos_E)
  n = jnp.ones((B,), jnp.int32)

  def next_input(state, out: StepOut, i):
    buf, done, n = state
    tok = jnp.where(done, pad_id, pick(out.logits))
    buf = jax.lax.dynamic_update_slice_in_dim(buf, tok[:, None], i + 1, axis=1)
    n = n + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, eos_E)
    return model.embed_tokens(tok), (buf, done, n), None

  carry = Carry(model.embed_tokens(tok0), pos_B, cache, (buf, done, n))
  carry, _ = while_steps(model, carry, next_input, max_new - 1, lambda s: jnp.all(s[1]))
  buf, _, n = carry.state
  return buf, n


class Generator:
  """Jitted greedy generation for one model; compiles once per (B, P, max_new).

  Under a mesh context (`sharding.use_mesh`) the weights are sharded by its rules and prompts split
  along the batch axes.
  """

  def __init__(self, model: Transformer, pad_id: int, eos_ids: Sequence[int]):
    self.model = JittedModel(model)
    self.pad_id = int(pad_id)
    self.eos = jnp.asarray(sorted(set(int(e) for e in eos_ids)), jnp.int32)
    self._generate = self.model.jit(self._greedy, static_argnames=("max_new",))

  @property
  def compiles(self) -> int:
    return self.model.compiles

  def _greedy(self, model: Transformer, ids, mask, eos, *, max_new: int):
    logits, cache, pos = prefill(model, ids, mask, ids.shape[1] + max_new)
    return greedy_loop(model, logits, cache, pos, max_new, eos, self.pad_id)

  def __call__(
    self,
    prompts: Sequence[Sequence[int]],
    max_new: int,
    *,
    length_bucket: int = 32,
    batch: int | None = None,
  ) -> list[list[int]]:
    """Greedy continuations (stop id included) of each prompt."""
    if max_new < 1:
      raise ValueError("max_new must be >= 1")
    B = batch or len(prompts)
    rows = list(prompts) + [[self.pad_id]] * (B - len(prompts))
    width = bucket_size(max(len(p) for p in rows), length_bucket)
    ids, mask = (self.model.put_batch(x) for x in left_pad(rows, self.pad_id, width))
    toks, n = jax.device_get(self._generate(ids, mask, self.eos, max_new=max_new))
    return [toks[i, : n[i]].tolist() for i in range(len(prompts))]
