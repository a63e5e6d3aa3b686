"""Batched greedy decoding on the shared step: prefill once, then a jitted loop over the cache.

Prompts are left-padded to a length bucket, so every row's last prompt token sits at the same slot
and one compile serves every prompt batch of that (batch, bucket, max_new_tokens) shape.

Shape legend: B batch, P padded prompt length, N new tokens, V vocab, E stop ids.
"""
# pylint: disable=invalid-name

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from codi_jax import sharding
from codi_jax.models import cache as kvc
from codi_jax.models.step import Loop, StepOut, merge, while_steps
from codi_jax.models.transformer import Transformer


def bucket(n: int, multiple: int = 32) -> int:
  """Rounds a length up to a multiple, so nearby lengths share one compiled program."""
  return max(multiple, -(-n // multiple) * multiple)


def left_pad(
  seqs: Sequence[Sequence[int]], pad_id: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
  """[B, length] ids and mask with every sequence right-aligned."""
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"sequence of {len(s)} tokens exceeds the bucket of {length}")
    if s:
      ids[i, length - len(s) :] = s
      mask[i, length - len(s) :] = True
  return ids, mask


def positions_from_mask(mask_BxP: jax.Array) -> jax.Array:
  """Positions counted from each row's first real token (pads get 0)."""
  return jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0).astype(jnp.int32)


def prefill(model: Transformer, ids_BxP, mask_BxP, capacity: int, positions=None):
  """Runs the prompt into a fresh cache; returns (last-position logits [B, V], cache, next pos [B]).

  positions default to counting from each row's first real token.
  """
  B, _ = ids_BxP.shape
  pos = positions_from_mask(mask_BxP) if positions is None else positions
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

  loop = Loop(model.embed_tokens(tok0), pos_B, cache, (buf, done, n))
  loop, _ = while_steps(model, loop, next_input, max_new - 1, lambda s: jnp.all(s[1]))
  buf, _, n = loop.state
  return buf, n


class Generator:
  """Jitted greedy generation for one model; compiles once per (B, P, max_new) and counts it.

  With a `mesh`, parameters are sharded by `rules` and prompts split along the batch axes.
  """

  def __init__(
    self, model: Transformer, pad_id: int, eos_ids: Sequence[int], *, mesh=None, rules=None
  ):
    self.graphdef, self.state = nnx.split(model)
    self.mesh, self.rules = mesh, (sharding.default_rules() if rules is None else rules)
    self.state = sharding.shard_state(self.state, mesh, self.rules)
    self.pad_id = int(pad_id)
    self.eos = jnp.asarray(sorted(set(int(e) for e in eos_ids)), jnp.int32)
    self.compiles = 0
    self._fn = jax.jit(
      self._generate, static_argnames=("max_new",), out_shardings=sharding.replicate_out(mesh)
    )

  def _generate(self, state, ids, mask, eos, *, max_new: int):
    self.compiles += 1  # runs at trace time only
    with sharding.activations(self.mesh, self.rules):
      model = merge(self.graphdef, state)
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
    ids, mask = left_pad(rows, self.pad_id, bucket(max(len(p) for p in rows), length_bucket))
    ids, mask = (sharding.put_batch(x, self.mesh, self.rules) for x in (ids, mask))
    toks, n = self._fn(self.state, ids, mask, self.eos, max_new=max_new)
    toks, n = np.asarray(toks), np.asarray(n)
    return [toks[i, : n[i]].tolist() for i in range(len(prompts))]
