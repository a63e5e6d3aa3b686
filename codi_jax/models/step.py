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
from flax import nnx

from codi_jax.models.cache import KVCache
from codi_jax.models.layers import fold
from codi_jax.models.transformer import Transformer


class StepOut(NamedTuple):
  logits: jax.Array  # [B, V] f32, at the last input position
  hidden: jax.Array  # [B, D] last hidden state (after the final norm) at the last input position
  hidden_states: tuple[jax.Array, ...] | None  # L+1 x [B, D] at the last position, HF convention
  cache: KVCache


class Loop(NamedTuple):
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
  mask_BxL=None,
  *,
  hidden_states: bool = False,
  rng: jax.Array | None = None,
) -> StepOut:
  """Input embeddings + positions + cache -> outputs at the last position + new cache."""
  out = model(
    embeds=x_BxLxD,
    positions=pos_BxL,
    mask=mask_BxL,
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
  loop: Loop,
  next_input: NextInput,
  num_steps: int,
  *,
  start: jax.Array | int = 0,
  hidden_states: bool = False,
  rng: jax.Array | None = None,
  remat: bool = False,
) -> tuple[Loop, Any]:
  """Runs `num_steps` one-position steps with `lax.scan`.

  next_input(state, out, i) -> (x_next [B, D], state, record) is a pure function of step i's
  outputs; records are stacked along a leading step axis. Gradients flow through the scan;
  remat=True wraps the body in jax.checkpoint to trade compute for memory.
  """

  def body(lp: Loop, i):
    out = step(
      model,
      lp.x[:, None],
      lp.pos[:, None],
      lp.cache,
      hidden_states=hidden_states,
      rng=fold(rng, i) if rng is not None else None,
    )
    x, state, record = next_input(lp.state, out, i)
    return Loop(x.astype(lp.x.dtype), lp.pos + 1, out.cache, state), record

  if remat:
    body = jax.checkpoint(body)
  return jax.lax.scan(body, loop, start + jnp.arange(num_steps))


def while_steps(
  model: Transformer,
  loop: Loop,
  next_input: NextInput,
  max_steps: int,
  done: Callable[[Any], jax.Array],
  *,
  chunk: int = 1,
) -> tuple[Loop, jax.Array]:
  """Open-ended decoding: `scan_steps` in chunks of `chunk` inside a `lax.while_loop`.

  Stops once done(state) is true or max_steps steps ran (rounded up to a whole chunk). Records are
  dropped: next_input writes what it keeps into buffers in its state. Returns (loop, steps run).
  """

  def cond(c):
    lp, n = c
    return (n < max_steps) & ~done(lp.state)

  def body(c):
    lp, n = c
    lp, _ = scan_steps(model, lp, next_input, chunk, start=n)
    return lp, n + chunk

  return jax.lax.while_loop(cond, body, (loop, jnp.zeros((), jnp.int32)))


def merge(graphdef: nnx.GraphDef, *states) -> Transformer:
  """Rebuilds the module inside a jitted pure function (split once outside, merge per trace)."""
  return nnx.merge(graphdef, *states)
