"""The shared primitive: feed input embeddings, advance the KV cache; and one scan over such steps.

CODI's continuous thoughts (hidden state -> projection -> next input), soft thinking (probability
mixture of token embeddings -> next input) and plain decoding (a token's embedding -> next input)
are all `scan_steps` (or `while_steps`) with a different caller-supplied `next_input`.

Shape legend: B batch, L input length, D model, V vocab.
"""
# pylint: disable=invalid-name

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from codi_jax.models.cache import KVCache
from codi_jax.models.layers import RematPolicy, checkpoint, fold
from codi_jax.models.transformer import Transformer


class StepOut(NamedTuple):
  logits: jax.Array  # [B, V] f32, at the last input position
  hidden: jax.Array  # [B, D] last hidden state (after the final norm) at the last input position
  hidden_states: tuple[jax.Array, ...] | None  # L+1 x [B, D] at the last position, HF convention
  cache: KVCache


class Carry(NamedTuple):
  """Scan carry: the next input embedding, its position, the cache and the caller's state."""

  x: jax.Array  # [B, D]
  pos: jax.Array  # [B] int32
  cache: KVCache
  state: Any


def step(
  model: Transformer,
  x_BxLxD,
  pos_BxL,
  cache: KVCache,
  *,
  hidden_states: bool = False,
  rng: jax.Array | None = None,
) -> StepOut:
  """Input embeddings + positions + cache -> outputs at the last position + new cache."""
  out = model(
    embeds=x_BxLxD,
    positions=pos_BxL,
    cache=cache,
    logits="last",
    hidden_states=hidden_states,
    rng=rng,
  )
  hs = None if out.hidden_states is None else tuple(h[:, -1] for h in out.hidden_states)
  return StepOut(out.logits, out.hidden[:, -1], hs, out.cache)


NextInput = Callable[[Any, StepOut, jax.Array], tuple[jax.Array, Any, Any]]


def scan_steps(
  model: Transformer,
  carry: Carry,
  next_input: NextInput,
  num_steps: int,
  *,
  start: jax.Array | int = 0,
  rng: jax.Array | None = None,
  remat: bool = False,
  remat_policy: RematPolicy = "nothing_saveable",
) -> tuple[Carry, Any]:
  """Runs `num_steps` one-position steps with `lax.scan`.

  next_input(state, out, i) -> (x_next [B, D], state, record) is a pure function of step i's
  outputs; records are stacked along a leading step axis. Gradients flow through the scan;
  remat=True wraps the body in jax.checkpoint under `remat_policy` (activations recomputed in the
  backward pass, except what the policy saves).
  """

  def body(c: Carry, i):
    out = step(model, c.x[:, None], c.pos[:, None], c.cache, rng=fold(rng, i))
    x, state, record = next_input(c.state, out, i)
    return Carry(x.astype(c.x.dtype), c.pos + 1, out.cache, state), record

  if remat:
    body = checkpoint(body, remat_policy)
  return jax.lax.scan(body, carry, start + jnp.arange(num_steps))


def while_steps(
  model: Transformer,
  carry: Carry,
  next_input: NextInput,
  max_steps: int,
  done: Callable[[Any], jax.Array],
  *,
  chunk: int = 1,
  start: jax.Array | int = 0,
  room: bool = False,
) -> tuple[Carry, jax.Array]:
  """Open-ended decoding: `scan_steps` in chunks of `chunk` inside a `lax.while_loop`.

  Stops once done(state) is true or max_steps steps ran (rounded up to a whole chunk); with
  room=True also before a chunk that would not fit in the cache (a length-aware segment, resumed in
  a larger cache). start: steps already run (step indices continue from it). Records are dropped:
  next_input writes what it keeps into buffers in its state. Returns (carry, steps run in total).
  """

  def cond(loop_state):
    c, n = loop_state
    go = (n < max_steps) & ~done(c.state)
    if room:
      go = go & (c.cache.end + chunk <= c.cache.capacity)
    return go

  def body(loop_state):
    c, n = loop_state
    c, _ = scan_steps(model, c, next_input, chunk, start=n)
    return c, n + chunk

  return jax.lax.while_loop(cond, body, (carry, jnp.asarray(start, jnp.int32)))
