"""Batched greedy decoding on the shared step: prefill once, then a jitted loop over the cache;
and the host side shared by every decoder: length-aware segments (`Segmented`) and the front end
(`HostDecoder`: prompt batches, cache buckets, memory check, per-row results).

Prompts are left-padded to a length bucket, so every row's last prompt token sits at the same slot
and one compile serves every prompt batch of that (batch, bucket, max_new_tokens) shape.

Length-aware decoding. A step attends over every slot of its cache, so a cache sized for the whole
budget (prompt + max_new; 32k in the reasoning presets) makes a step at position 300 cost what one
at 32,000 costs, and allocates the full budget up front. Instead the cache starts at a small bucket
and grows by doubling (`cache.capacities`, `cache.grow`): the loop runs as `lax.while_loop`
segments, each until every row is done or the next chunk of steps would not fit, and the host
(`Segmented`) pads the cache to the next bucket and resumes. A step then costs at most about twice
the filled slots, and the cache holds at most about twice the longest row; the last bucket is the
fixed path's capacity. The step, the per-row state, the shared write slot and the step indices
(hence every sampler draw) are those of the fixed path, and so are the tokens: the same masked
attention over the same filled slots, with fewer empty ones. Bitwise, XLA may sum a softmax row of
another length in another order (last-bit differences, as between two budgets of the fixed path,
whose capacity is prompt + budget); a length-aware run does not depend on its budget before its
last bucket. Costs: one compiled program per bucket reached (at most 1 + log2(budget /
min_capacity) per run, shared by later runs), one host sync per bucket and a copy of the cache at
each growth (less than the final cache over a run; old and new cache coexist during a growth).
Why not the alternatives: blockwise attention with an online softmax over the filled prefix saves
the compute but still allocates the whole budget, adds a dynamic loop to every layer of every
step and changes every path's arithmetic; a Pallas / cuDNN kernel would do the same on one backend
only. Buckets are portable, keep the one attention code path, and bound memory too.
`min_capacity=None` selects the fixed-capacity path (one bucket).

Shape legend: B batch, P padded prompt length, N new tokens, V vocab, E stop ids, D model.
"""
# pylint: disable=invalid-name

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from codi_jax import sharding
from codi_jax.batching import bucket_size, left_pad
from codi_jax.models import cache as kvc
from codi_jax.models import memory
from codi_jax.models.jitted import JittedModel
from codi_jax.models.positions import PaddingMode, positions
from codi_jax.models.step import Carry, NextInput, StepOut, while_steps
from codi_jax.models.transformer import Transformer

# Smallest cache bucket of length-aware decoding (slots per row).
DEFAULT_MIN_CAPACITY = 256


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


# ---------------------------------------------------------------------------------------------
# Length-aware segments


class Segment(NamedTuple):
  """A decode loop paused because its cache is full; resumed (`resume`) in a larger cache."""

  x: jax.Array  # [B, D] the next input
  pos: jax.Array  # [B] int32 its positions
  cache: kvc.KVCache
  n: jax.Array  # [] int32 steps run so far


def run_segment(
  model: Transformer,
  carry: Carry,
  next_input: NextInput,
  max_steps: int,
  done: Callable[[Any], jax.Array],
  *,
  last: bool,
  chunk: int = 1,
  start: jax.Array | int = 0,
):
  """`while_steps` in the carry's cache: until done, max_steps, or (unless `last`) a full cache.

  Returns (Segment to resume, None when last; (the caller's loop state, more [] bool: steps remain
  and a row is still running)). In the last bucket it is exactly the fixed-capacity loop.
  """
  carry, n = while_steps(
    model, carry, next_input, max_steps, done, chunk=chunk, start=start, room=not last
  )
  if last:
    return None, (carry.state, jnp.zeros((), bool))
  more = (n < max_steps) & ~done(carry.state)
  return Segment(carry.x, carry.pos, carry.cache, n), (carry.state, more)


def resume(seg: Segment, state, capacity: int) -> tuple[Carry, jax.Array]:
  """(carry, steps run) of a paused segment, its cache grown to `capacity` slots."""
  return Carry(seg.x, seg.pos, kvc.grow(seg.cache, capacity), state), seg.n


class Segmented:
  """Host driver of length-aware decoding: a start and a resume program on one `JittedModel`.

  start(model, *args, capacity=, last=, **static) prefills into a `capacity`-slot cache and runs
  the first segment; resume(model, segment, loop_state, *args, capacity=, last=, **static) grows
  the cache and runs the next. Both return `run_segment`'s result. Each is compiled once per shape
  and capacity bucket (start counted under `name`, resume under `name + "_resume"`); the paused
  segment keeps its sharding between calls, the loop state comes back replicated.
  """

  def __init__(
    self,
    jm: JittedModel,
    start: Callable,
    resume_fn: Callable,
    *,
    static_argnames: Sequence[str] = (),
    start_static_argnames: Sequence[str] = (),
    name: str | None = None,
  ):
    name = name or start.__name__
    static = (*static_argnames, "capacity", "last")
    self._start = jm.jit(
      start, static_argnames=(*static, *start_static_argnames), name=name, carry=True
    )
    self._resume = jm.jit(resume_fn, static_argnames=static, name=f"{name}_resume", carry=True)
    self.last_capacity = None  # the largest bucket the last call reached

  def lower(
    self, capacity: int, args: Sequence[Any], *, state=None, start_static: dict | None = None
  ):
    """`start` in one `capacity`-slot bucket run to the end (the fixed-capacity program of that
    bucket): a function of the static arguments giving the lowered program, for ahead-of-time
    compilation. args (and state) may be ShapeDtypeStructs."""

    def lowered(**static):
      return self._start.lower(
        *args, state=state, capacity=capacity, last=True, **(start_static or {}), **static
      )

    return lowered

  def __call__(
    self,
    capacities: Sequence[int],
    args: Sequence[Any],
    resume_args: Sequence[Any] = (),
    *,
    state=None,
    start_static: dict | None = None,
    **static,
  ):
    """The loop state after the run: start in capacities[0], then resume in each next bucket
    while a row runs (one host sync per bucket). state: model weights (default the JittedModel's);
    start_static: static arguments of start only."""
    caps = tuple(capacities)
    seg, (st, more) = self._start(
      *args, state=state, capacity=caps[0], last=len(caps) == 1, **(start_static or {}), **static
    )
    self.last_capacity = caps[0]
    for i, cap in enumerate(caps[1:], 2):
      if seg is None or not bool(more):
        break
      seg, (st, more) = self._resume(
        seg, st, *resume_args, state=state, capacity=cap, last=i == len(caps), **static
      )
      self.last_capacity = cap
    return st


class HostDecoder:
  """The host front end every decoder shares (`Generator`, `soft_jax.decode.SoftDecoder`,
  `codi.decoder.CodiDecoder`): the model split once, prompts padded to a fixed shape and put on its
  mesh, the cache buckets and their memory check before anything runs, and each row's tokens cut
  to its length. Subclasses jit their programs on `self.model` and run them through `decode`.
  """

  def __init__(self, model: nnx.Module | JittedModel, pad_id: int, min_capacity: int | None):
    self.model = model if isinstance(model, JittedModel) else JittedModel(model)
    self.pad_id = int(pad_id)
    # Length-aware decoding: the cache starts at a bucket of at least this many slots and doubles
    # as rows grow; None: the fixed capacity. Read at each call.
    self.min_capacity = min_capacity
    self._last: Segmented | None = None  # the programs of the last call

  @property
  def compiles(self) -> int:
    """Compiles of every program so far (`JittedModel.compiles`)."""
    return self.model.compiles

  @property
  def last_capacity(self) -> int | None:
    """Cache slots per row at the end of the last call."""
    return None if self._last is None else self._last.last_capacity

  def capacities(self, used: int, new: int, chunk: int = 1) -> tuple[int, ...]:
    """The cache buckets of a run whose loop starts after `used` slots and runs `new` steps."""
    return kvc.capacities(used, used + new, self.min_capacity, chunk)

  def prompt_batch(
    self,
    prompts: Sequence[Sequence[int]],
    buckets: int | Sequence[int],
    *,
    width: int | None = None,
    batch: int | None = None,
    suffix: Sequence[int] = (),
  ) -> tuple[np.ndarray, np.ndarray]:
    """[batch, width] host ids and mask: each prompt + `suffix` left-padded, then one-pad-token
    rows up to `batch` (default len(prompts)); width defaults to the longest row's bucket."""
    rows = [[*p, *suffix] for p in prompts]
    rows += [[self.pad_id]] * ((batch or len(prompts)) - len(prompts))
    width = width or bucket_size(max(len(r) for r in rows), buckets)
    return left_pad(rows, self.pad_id, width)

  def put(self, ids, mask) -> tuple[jax.Array, jax.Array]:
    """A host prompt batch split along the batch axes of the model's mesh."""
    return self.model.put_batch(ids), self.model.put_batch(mask)

  def abstract_batch(self, batch: int, width: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """(ids, mask) of a [batch, width] prompt batch as shapes with their batch sharding, to lower
    a program ahead of time without allocating."""
    with self.model.context():
      sh = sharding.batch_sharding((batch, width))
      return tuple(jax.ShapeDtypeStruct((batch, width), t, sharding=sh) for t in (np.int32, bool))

  def check_fits(
    self,
    batch: int,
    caps: Sequence[int],
    width: int,
    max_new: int,
    *,
    what: str = "",
    out_bytes_per_token: int = 4,
  ) -> int:
    """Refuses (InputError, `what` prefixing the message) a call whose last cache bucket cannot
    fit; returns the estimate. Nothing is allocated."""
    return memory.check_decode(
      self.model.config, batch, caps, prompt_len=width, new_tokens=max_new,
      out_bytes_per_token=out_bytes_per_token, mesh=self.model.mesh, rules=self.model.rules,
      what=f"{what}max_new_tokens={max_new}",
    )  # fmt: skip

  def decode(self, run: Segmented, caps: Sequence[int], args, resume_args=(), **kwargs):
    """`run`'s loop state after a run through the buckets `caps` (kept for `last_capacity`)."""
    self._last = run
    return run(caps, args, resume_args, **kwargs)

  @staticmethod
  def cut(tokens, lengths, rows: int) -> list[list[int]]:
    """The first `rows` rows of a host [B, N] token batch, each cut to its length."""
    return [tokens[i, : lengths[i]].tolist() for i in range(rows)]


# ---------------------------------------------------------------------------------------------
# Greedy


def _picker(vocab: int, suppress):
  banned = jnp.zeros((vocab,), bool).at[jnp.asarray(suppress, jnp.int32)].set(True)
  return lambda logits: jnp.argmax(jnp.where(banned, -jnp.inf, logits), -1).astype(jnp.int32)


def greedy_init(
  model: Transformer, logits_BxV, cache, pos_B, max_new: int, eos_E, pad_id: int, suppress=()
) -> Carry:
  """The greedy loop's carry: token 0 from the prefill logits, state (tokens [B, N], done, n)."""
  B = logits_BxV.shape[0]
  tok0 = _picker(logits_BxV.shape[-1], suppress)(logits_BxV)
  buf = jnp.full((B, max_new), pad_id, jnp.int32).at[:, 0].set(tok0)
  done = jnp.isin(tok0, eos_E)
  n = jnp.ones((B,), jnp.int32)
  return Carry(model.embed_tokens(tok0), pos_B, cache, (buf, done, n))


def greedy_segment(
  model: Transformer,
  carry: Carry,
  max_new: int,
  eos_E,
  pad_id: int,
  suppress=(),
  *,
  last: bool,
  start: jax.Array | int = 0,
):
  """Greedy steps from `carry` in its cache (`run_segment`); tokens 1..max_new-1."""
  pick = _picker(model.cfg.vocab_size, suppress)

  def next_input(state, out: StepOut, i):
    buf, done, n = state
    tok = jnp.where(done, pad_id, pick(out.logits))
    buf = jax.lax.dynamic_update_slice_in_dim(buf, tok[:, None], i + 1, axis=1)
    n = n + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, eos_E)
    return model.embed_tokens(tok), (buf, done, n), None

  return run_segment(
    model, carry, next_input, max_new - 1, lambda s: jnp.all(s[1]), last=last, start=start
  )


def greedy_loop(
  model: Transformer, logits_BxV, cache, pos_B, max_new: int, eos_E, pad_id: int, suppress=()
):
  """Greedy continuation from prefill logits in a fixed-capacity cache: tokens [B, N] (pad after a
  row's stop) and lengths [B]. `suppress` lists token ids that are never emitted (e.g. CODI's
  pad/bot/eot)."""
  carry = greedy_init(model, logits_BxV, cache, pos_B, max_new, eos_E, pad_id, suppress)
  _, ((buf, _, n), _) = greedy_segment(model, carry, max_new, eos_E, pad_id, suppress, last=True)
  return buf, n


def greedy_resume(
  model: Transformer, seg, state, eos_E, *, max_new: int, pad_id: int, suppress=(), capacity, last
):
  """The next greedy segment in a cache grown to `capacity` (a `Segmented` resume)."""
  carry, n = resume(seg, state, capacity)
  return greedy_segment(model, carry, max_new, eos_E, pad_id, suppress, last=last, start=n)


class Generator(HostDecoder):
  """Jitted greedy generation for one model; compiles once per (B, P, max_new) and capacity bucket.

  Length-aware (module docstring): the cache starts at a bucket of at least `min_capacity` slots
  and doubles as rows grow; min_capacity=None is the fixed-capacity path (P + max_new slots, one
  program). The attribute is read at each call. Under a mesh context (`sharding.use_mesh`) the
  weights are sharded by its rules and prompts split along the batch axes.
  """

  def __init__(
    self,
    model: Transformer,
    pad_id: int,
    eos_ids: Sequence[int],
    *,
    min_capacity: int | None = DEFAULT_MIN_CAPACITY,
  ):
    super().__init__(model, pad_id, min_capacity)
    self.eos = jnp.asarray(sorted(set(int(e) for e in eos_ids)), jnp.int32)
    self._run = Segmented(
      self.model, self._greedy, self._resume, static_argnames=("max_new",), name="_greedy"
    )

  def _greedy(self, model: Transformer, ids, mask, eos, *, max_new: int, capacity: int, last):
    logits, cache, pos = prefill(model, ids, mask, capacity)
    carry = greedy_init(model, logits, cache, pos, max_new, eos, self.pad_id)
    return greedy_segment(model, carry, max_new, eos, self.pad_id, last=last)

  def _resume(self, model: Transformer, seg, st, eos, *, max_new: int, capacity: int, last):
    return greedy_resume(
      model, seg, st, eos, max_new=max_new, pad_id=self.pad_id, capacity=capacity, last=last
    )

  def check_memory(self, batch: int, caps: Sequence[int], width: int, max_new: int) -> int:
    """Refuses (InputError) a call whose last cache bucket cannot fit; nothing is allocated."""
    return self.check_fits(batch, caps, width, max_new)

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
    ids, mask = self.prompt_batch(prompts, length_bucket, batch=B)
    width = ids.shape[1]
    caps = self.capacities(width, max_new)
    self.check_memory(B, caps, width, max_new)
    args = (*self.put(ids, mask), self.eos)
    toks, _, n = jax.device_get(self.decode(self._run, caps, args, (self.eos,), max_new=max_new))
    return self.cut(toks, n, len(prompts))
