"""Batched Soft Thinking decoding: prefill once, then one jitted fixed-shape loop on the shared step.

(Over 400 lines: the per-step phase machine and `SoftDecoder`, which jits it, read as one unit.)

Every row starts in the thinking phase. Per step (docs/soft_thinking.md, per-step algorithm and
phase control):
`sampling.sample_step` gives the row's emitted token and the thinking concept token; then, per row
and with `jnp.where` only, Cold Stop (soft modes: P consecutive thinking steps with entropy < theta
replace the token with `</think>`), the thinking budget (`max_thinking_tokens`), the `</think>`
switch (the row enters the answer phase: after-thinking parameters, one-hot inputs), EOS and the
length limit. Thinking rows of the soft modes feed the concept token's embedding mixture; all other
rows feed their emitted token one-hot, i.e. exactly its embedding.

Models without a single `</think>` token (e.g. SmolLM2): pass think_end_id=None; thinking then ends
only by Cold Stop or the thinking budget, and the emitted token is kept as is.

The loop is `step.while_steps` (chunks of `step.scan_steps`), so it is the one shared step; for
analyses, `emit` is the pure per-step update. `SoftDecoder` runs it length-aware
(`codi_jax.decoding`): segments in a KV cache that starts at a small capacity bucket and doubles
as the longest row grows, so a step costs what the filled slots cost rather than the whole
max_new_tokens budget. Step indices (and so every row's draws, keyed by sample id and step) and
the per-row state carry across segments unchanged; `decode_loop` is the fixed-capacity loop.

Shape legend: B batch, P padded prompt length, N max new tokens, V vocab, K concept width
(max_topk), D model, E stop ids.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax import sharding
from codi_jax.decoding import (
  DEFAULT_MIN_CAPACITY,
  HostDecoder,
  Segmented,
  prefill,
  resume,
  run_segment,
)
from codi_jax.errors import InputError
from codi_jax.models.cache import KVCache
from codi_jax.models.step import Carry, StepOut
from codi_jax.models.transformer import Transformer
from soft_jax import sampling
from soft_jax.sampling import Sampled, SamplerParams

STOP_NONE, STOP_EOS, STOP_ABORT = 0, 1, 2
STOP_REASONS = {STOP_NONE: "length", STOP_EOS: "eos", STOP_ABORT: "abort"}


class Records(NamedTuple):
  """Per-step analysis buffers (record=True); entry t belongs to emitted token t."""

  idx: jax.Array  # [B, N, K] int32 the input fed after token t (concept token, or one-hot)
  w: jax.Array  # [B, N, K] f32 its weights
  entropy: jax.Array  # [B, N] f32 entropy of the distribution token t was drawn from (thinking T)
  thinking: jax.Array  # [B, N] bool token t was emitted in the thinking phase (`</think>` included)


class DecodeState(NamedTuple):
  """Loop state (fixed shapes). After the loop: the batched result."""

  tokens: jax.Array  # [B, N] int32 emitted tokens, pad after the row stopped
  n: jax.Array  # [B] int32 tokens emitted
  n_think: jax.Array  # [B] int32 tokens emitted in the thinking phase (`</think>` included)
  in_think: jax.Array  # [B] bool
  done: jax.Array  # [B] bool
  low_run: jax.Array  # [B] int32 consecutive steps with entropy < theta (reset by the switch)
  stop: jax.Array  # [B] int32 STOP_* code
  records: Records | None


@dataclasses.dataclass
class SoftResult:
  """One prompt's continuation."""

  tokens: list[
    int
  ]  # everything emitted: thinking trace (per-step top-1), `</think>`, answer, stop id
  thinking_tokens: int  # tokens emitted while thinking (`</think>` included)
  answer_tokens: list[int]  # tokens[thinking_tokens:]; empty if thinking never ended
  stop_reason: str  # eos | length | abort
  thinking_closed: bool  # whether the row reached the answer phase
  records: dict[str, np.ndarray] | None = None  # Records fields cut to [len(tokens), ...]


def init_state(batch: int, max_new: int, k: int, pad_id: int, record: bool = False) -> DecodeState:
  """Every row thinking, nothing emitted."""
  B, N = batch, max_new
  zi = jnp.zeros((B,), jnp.int32)
  recs = None
  if record:
    recs = Records(
      jnp.zeros((B, N, k), jnp.int32),
      jnp.zeros((B, N, k), jnp.float32),
      jnp.zeros((B, N), jnp.float32),
      jnp.zeros((B, N), bool),
    )
  return DecodeState(
    jnp.full((B, N), pad_id, jnp.int32),
    zi,
    zi,
    jnp.ones((B,), bool),
    jnp.zeros((B,), bool),
    zi,
    zi,
    recs,
  )


def transition(
  params: SamplerParams,
  st: DecodeState,
  s: Sampled,
  i,
  *,
  think_end_id,
  eos_ids,
  pad_id: int,
  max_new: int,
) -> tuple[DecodeState, jax.Array, jax.Array]:
  """Writes token i of every row and advances its phase; returns (state, next idx, next w).

  Pure, per-row (`jnp.where` only). think_end_id: an id, or None / a negative value for none (may
  be traced). Rows already done emit nothing (their next input is irrelevant).
  """
  think_end = jnp.asarray(-1 if think_end_id is None else think_end_id, jnp.int32)
  has_end = think_end >= 0
  theta = params.cold_stop_entropy
  active = ~st.done
  thinking = st.in_think & active
  low_run = jnp.where(active & (s.entropy < theta), st.low_run + 1, 0)
  n_think = st.n_think + thinking.astype(jnp.int32)
  cold = thinking & (theta > 0) & (low_run >= params.cold_stop_patience)
  if not params.soft:
    cold = jnp.zeros_like(cold)  # Cold Stop is part of soft thinking, not of the token baselines
  budget = thinking & (params.max_thinking_tokens > 0) & (n_think >= params.max_thinking_tokens)
  forced = cold | budget
  # A forced end emits `</think>` in place of the sampled token (without one, the token is kept).
  tok = jnp.where(forced & has_end, think_end, s.token)
  ended = thinking & (forced | (has_end & (tok == think_end)))
  abort = jnp.zeros_like(active)
  if params.answer_low_entropy_abort:
    abort = active & ~st.in_think & (theta > 0) & (low_run >= params.cold_stop_patience)

  K = params.max_topk
  hot_idx, hot_w = sampling.one_hot_input(tok, K)
  soft_next = (thinking & ~ended)[:, None] if params.soft else jnp.zeros((tok.shape[0], 1), bool)
  idx = jnp.where(soft_next, s.idx, hot_idx)
  w = jnp.where(soft_next, s.w, hot_w)

  tokens = st.tokens.at[:, i].set(jnp.where(active, tok, pad_id), mode="drop")
  n = st.n + active.astype(jnp.int32)
  eos = active & jnp.isin(tok, jnp.asarray(eos_ids, jnp.int32))
  stop = jnp.where(eos, STOP_EOS, jnp.where(abort, STOP_ABORT, st.stop))
  recs = st.records
  if recs is not None:
    recs = Records(
      recs.idx.at[:, i].set(idx, mode="drop"),
      recs.w.at[:, i].set(w, mode="drop"),
      recs.entropy.at[:, i].set(s.entropy, mode="drop"),
      recs.thinking.at[:, i].set(thinking, mode="drop"),
    )
  new = DecodeState(
    tokens,
    n,
    n_think,
    st.in_think & ~ended,
    st.done | eos | abort | (n >= max_new),
    jnp.where(ended, 0, low_run),
    stop,
    recs,
  )
  return new, idx, w


def row_keys(key: jax.Array, sample_ids_B: jax.Array) -> jax.Array:
  """One key per row from the call's key and the row's sample id (batch-invariant draws)."""
  return sampling.fold_keys(jnp.broadcast_to(key, sample_ids_B.shape), sample_ids_B)


def embed_input(model: Transformer, params: SamplerParams, idx_BxK, w_BxK) -> jax.Array:
  """Next input embedding [B, D] in the model's compute dtype: the K rows mixed by their weights."""
  dtype = jnp.dtype(model.cfg.dtype)
  accum = jnp.float32 if params.embed_mix_dtype == "float32" else dtype
  rows = model.embed.rows(jnp.clip(idx_BxK, 0, model.cfg.vocab_size - 1))
  return sampling.mix_embeddings(rows, w_BxK, dtype, accum)


def emit(
  model: Transformer,
  params: SamplerParams,
  st: DecodeState,
  logits_BxV,
  keys_B,
  i,
  *,
  think_end_id,
  eos_ids,
  pad_id: int,
  max_new: int,
):
  """Samples token i from its logits, updates the state; returns (state, next input [B, D])."""
  s = sampling.sample_step(params, logits_BxV, sampling.fold_keys(keys_B, i), st.in_think)
  st, idx, w = transition(
    params, st, s, i, think_end_id=think_end_id, eos_ids=eos_ids, pad_id=pad_id, max_new=max_new
  )
  return st, embed_input(model, params, idx, w)


def decode_init(
  model: Transformer,
  params: SamplerParams,
  logits_BxV,
  cache: KVCache,
  pos_B,
  *,
  max_new: int,
  keys_B,
  eos_ids,
  pad_id: int,
  think_end_id,
  record: bool = False,
) -> Carry:
  """The loop's carry: token 0 emitted from the prefill logits (so the first decode step is soft,
  as the reference); every other state field initial."""
  B = logits_BxV.shape[0]
  common = {"think_end_id": think_end_id, "eos_ids": eos_ids, "pad_id": pad_id, "max_new": max_new}
  st = init_state(B, max_new, params.max_topk, pad_id, record)
  st, x = emit(model, params, st, logits_BxV, keys_B, 0, **common)
  return Carry(x, pos_B, cache, st)


def decode_segment(
  model: Transformer,
  params: SamplerParams,
  carry: Carry,
  *,
  max_new: int,
  keys_B,
  eos_ids,
  pad_id: int,
  think_end_id,
  last: bool,
  start=0,
  chunk: int = 8,
):
  """Decode steps from `carry` in its cache (`decoding.run_segment`): tokens 1..max_new-1, in
  chunks, until every row is done (or, unless `last`, the cache is full)."""
  common = {"think_end_id": think_end_id, "eos_ids": eos_ids, "pad_id": pad_id, "max_new": max_new}

  def next_input(st, out: StepOut, i):
    st, x = emit(model, params, st, out.logits, keys_B, i + 1, **common)
    return x, st, None

  return run_segment(
    model,
    carry,
    next_input,
    max_new - 1,
    lambda s: jnp.all(s.done),
    last=last,
    chunk=chunk,
    start=start,
  )


def decode_loop(
  model: Transformer,
  params: SamplerParams,
  logits_BxV,
  cache: KVCache,
  pos_B,
  *,
  max_new: int,
  key: jax.Array,
  sample_ids=None,
  eos_ids,
  pad_id: int,
  think_end_id,
  record: bool = False,
  chunk: int = 8,
) -> DecodeState:
  """Continues every row from its prefill logits for at most max_new tokens in a fixed-capacity
  cache (jit-friendly); `SoftDecoder` runs the same loop length-aware."""
  B = logits_BxV.shape[0]
  keys = row_keys(key, jnp.arange(B) if sample_ids is None else sample_ids)
  common = {"max_new": max_new, "keys_B": keys, "eos_ids": eos_ids, "pad_id": pad_id}
  carry = decode_init(
    model, params, logits_BxV, cache, pos_B, think_end_id=think_end_id, record=record, **common
  )
  _, (st, _) = decode_segment(
    model, params, carry, think_end_id=think_end_id, last=True, chunk=chunk, **common
  )
  return st


class SoftDecoder(HostDecoder):
  """Jitted soft/stochastic-soft/token decoding for one model.

  Splits the model once (`JittedModel`), compiles once per (B, P, max_new, record, static sampler
  fields) and capacity bucket, and counts compiles in `.compiles`. Length-aware
  (`codi_jax.decoding`): the cache starts at a bucket of at least `min_capacity` slots and doubles
  as rows grow; min_capacity=None is the fixed-capacity path (P + max_new slots). Float sampler
  knobs (temperatures, p's, gamma, tau, theta, P, budget) are traced: `params=` overrides per call
  without recompiling. The attributes `eos_ids`, `think_end_id` (None: no `</think>`) and
  `min_capacity` are read at each call; the first two are traced too. Under a mesh context
  (`sharding.use_mesh`) parameters are sharded by its rules, prompts split along the batch axes,
  and results come back replicated.
  """

  def __init__(
    self,
    model: Transformer,
    params: SamplerParams,
    *,
    pad_id: int,
    eos_ids: Sequence[int],
    think_end_id: int | None = None,
    chunk: int = 8,
    min_capacity: int | None = DEFAULT_MIN_CAPACITY,
  ):
    self.vocab = model.cfg.vocab_size
    self.params = params.validate(vocab=self.vocab)
    super().__init__(model, pad_id, min_capacity)
    # Both are read at call time and traced: changing them between calls does not recompile
    # (a different number of stop ids does).
    self.eos_ids = tuple(sorted({int(e) for e in eos_ids}))
    self.think_end_id = think_end_id
    self.chunk = int(chunk)
    self._run = Segmented(
      self.model, self._decode, self._resume, static_argnames=("max_new", "record")
    )

  def _consts(self, seed: int, sample_ids, params: SamplerParams) -> tuple:
    """The traced arguments after the prompts: stop ids, `</think>` (-1: none), the call's key,
    sample ids [B], sampler parameters."""
    end = -1 if self.think_end_id is None else int(self.think_end_id)
    return (
      jnp.asarray(self.eos_ids, jnp.int32),
      jnp.asarray(end, jnp.int32),
      jax.random.key(seed),
      jnp.asarray(sample_ids, jnp.int32),
      params,
    )

  def _common(self, eos, think_end, key, sample_ids, max_new):
    return {
      "max_new": max_new,
      "keys_B": row_keys(key, sample_ids),
      "eos_ids": eos,
      "pad_id": self.pad_id,
      "think_end_id": think_end,
    }

  def _decode(
    self,
    model,
    ids,
    mask,
    eos,
    think_end,
    key,
    sample_ids,
    params,
    *,
    max_new: int,
    record: bool,
    capacity: int,
    last: bool,
  ):
    logits, cache, pos = prefill(model, ids, mask, capacity)
    common = self._common(eos, think_end, key, sample_ids, max_new)
    carry = decode_init(model, params, logits, cache, pos, record=record, **common)
    return decode_segment(model, params, carry, last=last, chunk=self.chunk, **common)

  def _resume(
    self,
    model,
    seg,
    st,
    eos,
    think_end,
    key,
    sample_ids,
    params,
    *,
    max_new: int,
    record: bool,
    capacity: int,
    last: bool,
  ):
    del record  # a static of the state's shapes; part of the program's key
    carry, n = resume(seg, st, capacity)
    common = self._common(eos, think_end, key, sample_ids, max_new)
    return decode_segment(model, params, carry, last=last, start=n, chunk=self.chunk, **common)

  def run(
    self,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    seed: int = 0,
    record: bool = False,
    params: SamplerParams | None = None,
    sample_ids=None,
    length_bucket: int = 32,
    batch: int | None = None,
  ) -> DecodeState:
    """The batched device result ([B, ...] arrays; rows past len(prompts) are padding).

    sample_ids [B] (default 0..B-1) seed each row's draws with the call's seed.
    """
    if max_new_tokens < 1:
      raise InputError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if not prompts:
      raise InputError("prompts: no prompt given")
    params = self.params if params is None else params.validate(vocab=self.vocab)
    B = batch or len(prompts)
    ids, mask = self.prompt_batch(prompts, length_bucket, batch=B)
    width = ids.shape[1]
    sids = np.arange(B) if sample_ids is None else np.asarray(sample_ids)
    if sids.shape != (B,):
      raise InputError(f"sample_ids: expected {B} ids, got shape {sids.shape}")
    end = -1 if self.think_end_id is None else int(self.think_end_id)
    if not -1 <= end < self.vocab:
      raise InputError(f"think_end_id: {end} is outside the vocabulary of {self.vocab}")
    caps = self.capacities(width, max_new_tokens, self.chunk)
    per_token = 4 + (params.max_topk * 8 + 5 if record else 0)  # tokens (+ records)
    self.check_fits(B, caps, width, max_new_tokens, out_bytes_per_token=per_token)
    consts = self._consts(seed, sids, params)
    args = (*self.put(ids, mask), *consts)
    return self.decode(self._run, caps, args, consts, max_new=max_new_tokens, record=record)

  def lower(self, batch: int, width: int, *, max_new_tokens: int, record: bool = False):
    """(lowered program, cache capacities) of one [batch, width] prompt batch in its last capacity
    bucket (that bucket's fixed-capacity program), for ahead-of-time compilation
    (`codi_jax.compile`); every argument is a shape, nothing is allocated."""
    caps = self.capacities(width, max_new_tokens, self.chunk)
    with self.model.context():
      consts = jax.eval_shape(lambda: self._consts(0, np.arange(batch), self.params))
      rep = sharding.replicated()
      consts = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), consts)
    lowered = self._run.lower(caps[-1], [*self.abstract_batch(batch, width), *consts])
    return lowered(max_new=max_new_tokens, record=record), caps

  def __call__(
    self,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    seed: int = 0,
    record: bool = False,
    params: SamplerParams | None = None,
    sample_ids=None,
    length_bucket: int = 32,
    batch: int | None = None,
  ) -> list[SoftResult]:
    """One SoftResult per prompt (stop id included in tokens)."""
    out = jax.device_get(
      self.run(
        prompts,
        max_new_tokens=max_new_tokens,
        seed=seed,
        record=record,
        params=params,
        sample_ids=sample_ids,
        length_bucket=length_bucket,
        batch=batch,
      )
    )
    results = []
    for b, toks in enumerate(self.cut(out.tokens, out.n, len(prompts))):
      n, nt = len(toks), int(out.n_think[b])
      recs = None
      if out.records is not None:
        recs = {f: np.asarray(getattr(out.records, f)[b, :n]) for f in Records._fields}
      results.append(
        SoftResult(
          toks, nt, toks[nt:], STOP_REASONS[int(out.stop[b])], not bool(out.in_think[b]), recs
        )
      )
    return results
