"""Soft Thinking samplers: pure functions from one step's logits to the emitted token and next input.

One thinking step (docs/soft_thinking.md 3):
temperature -> full-vocabulary softmax -> entropy (for Cold Stop, on the unfiltered p) -> top-k ->
top-p -> min-p (each followed by renormalisation) -> [Dirichlet resampling on the filtered
support] -> keep the top K and renormalise -> [Gumbel-Softmax on the kept K, re-sort] -> the concept
token (idx, w), sorted by descending weight. The emitted ("trace") token is idx[:, 0], exactly as
the reference: the argmax of the *noised* weights for `dirichlet` and `gumbel` (for `gumbel` that is
a Gumbel-max sample from the kept weights), the top-1 of the filtered distribution for `soft`.
The next input is sum_k w_k E[idx_k]: a gather of K embedding rows, never a [V, D] matmul.

`top_candidates` (one `lax.top_k(z, N)`, N = `SamplerParams.k_max`) runs once per step; both phases
filter within those N entries, which equals filtering the full vocabulary as long as N >= the
phase's top-k. No full-vocabulary sort, and the only full-vocabulary pass is the
entropy.

Random functions take one key per row (`keys_B`, a typed key array of shape [B]), so a row's draws
do not depend on which other rows share its batch.

Shape legend: B batch, V vocab, N candidates (k_max), K concept-token width (max_topk), D model.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from codi_jax.config_rules import INT32_MAX, Bool, Enum, Int, Num, check_values
from codi_jax.errors import InputError
from codi_jax.options import option, rules

MODES = ("greedy", "sample", "soft", "dirichlet", "gumbel")
SOFT_MODES = ("soft", "dirichlet", "gumbel")  # modes whose thinking inputs are concept tokens
ANSWER_PHASES = ("sample", "legacy_argmax")
EMBED_MIX_DTYPES = ("float32", "model")

# Purposes folded into a row's step key, so the draws of one step are independent.
_DIRICHLET, _GUMBEL, _THINK, _ANSWER = range(4)


@dataclasses.dataclass(frozen=True)
class SamplerParams:
  """Sampling parameters of both phases. Defaults: Soft Thinking (2505.15778), docs/soft_thinking.md 6.

  Registered as a pytree: the float/int knobs are traced leaves (changing them does not recompile),
  the fields that change shapes or code paths (mode, top-k sizes, flags) are static.
  """

  # Each knob's rule is on its field; the comments say where a default comes from.
  mode: str = option(Enum(MODES, doc="decoding mode"), "soft")
  temperature: float = option(Num(ge=0, doc="thinking temperature; 0 = argmax"), 0.6)
  top_k: int = option(Int(0, doc="thinking top-k; 0 = off (one full sort per step)"), 30)
  top_p: float = option(Num(gt=0, le=1, doc="thinking top-p"), 0.95)
  min_p: float = option(Num(ge=0, lt=1, doc="thinking min-p"), 0.001)  # ST value; SST uses 0.0
  max_topk: int = option(Int(1, doc="K: tokens mixed into a concept token"), 10)  # README 5-20
  dirichlet_alpha: float = option(Num(gt=0, doc="Dirichlet gamma"), 4.0)  # SST's best value
  gumbel_tau: float = option(Num(gt=0, doc="Gumbel-Softmax temperature"), 0.5)  # SST AIME/AMC
  after_temperature: float | None = option(  # None = reuse thinking T (reference quirk)
    Num(ge=0, optional=True, doc="answer temperature; None = thinking's"), 0.6
  )
  after_top_k: int = option(Int(0, doc="answer top-k; 0 = off"), 30)
  after_top_p: float = option(Num(gt=0, le=1, doc="answer top-p"), 0.95)
  after_min_p: float = option(Num(ge=0, lt=1, doc="answer min-p"), 0.0)
  cold_stop_entropy: float = option(Num(ge=0, doc="Cold Stop theta (nats); 0 = off"), 0.01)
  cold_stop_patience: int = option(Int(1, INT32_MAX, doc="Cold Stop patience P"), 256)
  entropy_normalized: bool = option(Bool(doc="entropy / ln V ([SST] presets)"), False)
  max_thinking_tokens: int = option(  # includes the forced `</think>`; 0 = off (parity)
    Int(0, INT32_MAX, doc="thinking budget; 0 = off"), 0
  )
  answer_phase: str = option(  # legacy_argmax: the published numbers, docs/soft_thinking.md 4.4
    Enum(ANSWER_PHASES, doc="answer phase"), "sample"
  )
  answer_low_entropy_abort: bool = option(  # HEAD-only behaviour
    Bool(doc="abort rows on P low-entropy answer steps"), False
  )
  embed_mix_dtype: str = option(  # "model": the reference's accumulation dtype
    Enum(EMBED_MIX_DTYPES, doc="mixture dtype"), "float32"
  )

  @property
  def soft(self) -> bool:
    """Whether thinking inputs are concept tokens (else one-hot, as token decoding)."""
    return self.mode in SOFT_MODES

  def replace(self, **changes) -> SamplerParams:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def k_max(self, vocab: int) -> int:
    """Candidates taken by the one `lax.top_k` per step: enough for both phases and K."""
    ks = [self.max_topk, self.top_k or vocab]
    if self.mode != "greedy":
      ks.append(self.after_top_k or vocab)
    return min(max(ks), vocab)

  def validate(self, prefix: str = "", vocab: int | None = None) -> SamplerParams:
    """Raises InputError naming the offending field (as `{prefix}{field}`); returns self.

    Each field against the rule on it, then K against top-k and the vocabulary.
    """
    check_values(self.to_dict(), rules(SamplerParams), prefix=prefix)
    if self.top_k and self.max_topk > self.top_k:
      raise InputError(
        f"{prefix}max_topk: K={self.max_topk} exceeds top_k={self.top_k} (the concept token is "
        "cut from the top-k support)"
      )
    if vocab is not None and self.max_topk > vocab:
      raise InputError(f"{prefix}max_topk: K={self.max_topk} exceeds the vocabulary size {vocab}")
    return self


jax.tree_util.register_dataclass(
  SamplerParams,
  data_fields=[
    "temperature",
    "top_p",
    "min_p",
    "dirichlet_alpha",
    "gumbel_tau",
    "after_temperature",
    "after_top_p",
    "after_min_p",
    "cold_stop_entropy",
    "cold_stop_patience",
    "max_thinking_tokens",
  ],
  meta_fields=[
    "mode",
    "top_k",
    "max_topk",
    "after_top_k",
    "entropy_normalized",
    "answer_phase",
    "answer_low_entropy_abort",
    "embed_mix_dtype",
  ],
)


class Sampled(NamedTuple):
  """One step's sampler output for every row."""

  token: jax.Array  # [B] int32 emitted token of the row's phase (before Cold Stop overrides)
  idx: jax.Array  # [B, K] int32 thinking concept token, by descending weight (valid ids if w = 0)
  w: jax.Array  # [B, K] f32 its weights, summing to 1
  entropy: jax.Array  # [B] f32 entropy of softmax(z / T_think) over the full vocabulary


def fold_keys(keys_B: jax.Array, data) -> jax.Array:
  """Per-row `fold_in`: [B] keys and an int (or [B] ints) -> [B] keys."""
  data = jnp.broadcast_to(jnp.asarray(data, jnp.uint32), keys_B.shape)
  return jax.vmap(jax.random.fold_in)(keys_B, data)


def _safe_t(temperature):
  t = jnp.asarray(temperature, jnp.float32)
  return t <= 0, jnp.where(t <= 0, 1.0, t)


def entropy(z_BxV: jax.Array, temperature, normalized: bool = False) -> jax.Array:
  """H(softmax(z / T)) in nats over the full vocabulary, -sum p log max(p, 1e-12); [B].

  T = 0 gives 0 (the one-hot argmax). normalized divides by ln V ([SST]).
  """
  greedy, t = _safe_t(temperature)
  p = jax.nn.softmax(z_BxV.astype(jnp.float32) / t, axis=-1)
  h = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-12)), axis=-1)
  if normalized:
    h = h / math.log(z_BxV.shape[-1])
  return jnp.where(greedy, 0.0, h)


def top_candidates(z_BxV: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` in f32 -> (values [B, k], ids [B, k] int32), sorted descending.

  The optimization barrier keeps XLA from decomposing TopK into a full-vocabulary sort when its
  outputs are sliced in different ways downstream (seen on CPU: a sort of [B, V] per step, 50-200x
  slower at V = 49152); the outputs are only [B, k], so the barrier costs nothing else. The barrier
  takes (ids, vals), not TopK's own (vals, ids) order: under SPMD partitioning XLA folds an
  identical tuple into the TopK itself, which crashes XLA:CPU's TopK decomposer (jax 0.10.2).
  """
  vals, ids = jax.lax.top_k(z_BxV.astype(jnp.float32), k)
  ids, vals = jax.lax.optimization_barrier((ids.astype(jnp.int32), vals))
  return vals, ids


def _renorm(q):
  return q / jnp.sum(q, axis=-1, keepdims=True)


def filter_sorted(top_z_BxN: jax.Array, temperature, top_k: int, top_p, min_p) -> jax.Array:
  """Filtered distribution over candidates sorted by descending logit; [B, N], sums to 1.

  softmax(z / T) restricted to the first top_k (= top-k then renormalise), then top-p (keep up to
  and including the entry whose cumulative mass reaches top_p), then min-p (drop q < min_p * max q),
  renormalising after each. The support is always a prefix. T = 0 gives one-hot on the first.
  """
  B, N = top_z_BxN.shape
  greedy, t = _safe_t(temperature)
  rank = jnp.arange(N)
  s = top_z_BxN.astype(jnp.float32) / t
  if top_k:
    s = jnp.where(rank < top_k, s, -jnp.inf)
  q = jax.nn.softmax(s, axis=-1)
  exclusive = jnp.cumsum(q, axis=-1) - q
  q = _renorm(jnp.where((exclusive < top_p) | (jnp.asarray(top_p) >= 1), q, 0.0))
  q = _renorm(jnp.where(q >= min_p * q[:, :1], q, 0.0))
  return jnp.where(greedy, jnp.broadcast_to(rank == 0, (B, N)).astype(jnp.float32), q)


def filter_logits(
  z_BxV: jax.Array, temperature, top_k: int, top_p, min_p, k_max: int
) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k` then `filter_sorted`: candidate ids [B, N] and their filtered probabilities."""
  top_z, top_i = top_candidates(z_BxV, k_max)
  return top_i, filter_sorted(top_z, temperature, top_k, top_p, min_p)


def dirichlet_resample(keys_B: jax.Array, q_BxN: jax.Array, alpha) -> jax.Array:
  """q' ~ Dir(alpha * q) restricted to supp(q) = {q > 1e-7}; [B, N], zero off the support.

  Drawn in log space (`jax.random.loggamma`, normalised with log-sum-exp), so tiny alpha * q does
  not underflow to an all-zero draw, and no mass can land outside the support.
  """
  support = q_BxN > 1e-7
  conc = jnp.where(support, alpha * q_BxN, 1.0)
  log_g = jax.vmap(jax.random.loggamma)(keys_B, conc)
  log_g = jnp.where(support, log_g, -jnp.inf)
  return jnp.exp(log_g - jax.nn.logsumexp(log_g, axis=-1, keepdims=True))


def cut(idx_BxN: jax.Array, q_BxN: jax.Array, k: int, *, sorted_q: bool = True):
  """Keeps the K largest weights (ids too) and renormalises; sorted_q: q already descending."""
  if sorted_q:
    idx, w = idx_BxN[:, :k], q_BxN[:, :k]
  else:
    w, order = jax.lax.top_k(q_BxN, k)
    idx = jnp.take_along_axis(idx_BxN, order, axis=1)
  return idx, _renorm(w)


def gumbel_softmax(keys_B: jax.Array, idx_BxK: jax.Array, w_BxK: jax.Array, tau):
  """softmax((log w + g) / tau), g ~ Gumbel(0, 1), re-sorted by descending weight.

  Entries with w = 0 stay 0. The first id is argmax(log w + g): an exact sample from w (Gumbel-max).
  The sort uses the noised logits, so underflowing weights cannot reorder it.
  """
  g = jax.vmap(lambda k: jax.random.gumbel(k, w_BxK.shape[1:], jnp.float32))(keys_B)
  logits = (jnp.log(w_BxK) + g) / tau
  logits, order = jax.lax.top_k(logits, w_BxK.shape[1])
  return jnp.take_along_axis(idx_BxK, order, axis=1), jax.nn.softmax(logits, axis=-1)


def categorical(keys_B: jax.Array, idx_BxN: jax.Array, q_BxN: jax.Array) -> jax.Array:
  """One id per row drawn from q over the candidate ids; [B] int32."""
  j = jax.vmap(jax.random.categorical)(keys_B, jnp.log(q_BxN))
  return jnp.take_along_axis(idx_BxN, j[:, None], axis=1)[:, 0].astype(jnp.int32)


def concept_token(params: SamplerParams, keys_B: jax.Array, idx_BxN: jax.Array, q_BxN: jax.Array):
  """Filtered candidates -> the thinking concept token (idx [B, K], w [B, K]), docs/soft_thinking.md 3 (steps 4-6).

  dirichlet: Dir(gamma q) on the filtered support, then the K-cut; gumbel: K-cut, then Gumbel-Softmax
  on the kept K. Other modes: the plain K-cut.
  """
  K = params.max_topk
  if params.mode == "dirichlet":
    q_BxN = dirichlet_resample(fold_keys(keys_B, _DIRICHLET), q_BxN, params.dirichlet_alpha)
    idx, w = cut(idx_BxN, q_BxN, K, sorted_q=False)
  else:
    idx, w = cut(idx_BxN, q_BxN, K)
  if params.mode == "gumbel":
    idx, w = gumbel_softmax(fold_keys(keys_B, _GUMBEL), idx, w, params.gumbel_tau)
  return idx, w


def one_hot_input(token_B: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """A discrete token as a concept token: ids [t, t, ...] (all valid), weights [1, 0, ...]."""
  idx = jnp.broadcast_to(token_B[:, None], (token_B.shape[0], k)).astype(jnp.int32)
  w = jnp.broadcast_to(jnp.arange(k) == 0, idx.shape).astype(jnp.float32)
  return idx, w


def sample_step(
  params: SamplerParams, z_BxV: jax.Array, keys_B: jax.Array, in_think_B: jax.Array
) -> Sampled:
  """One step of both phases; each row's `token` comes from its own phase.

  Thinking: greedy -> argmax; sample -> a draw from the thinking-filtered q; soft modes -> idx[0]
  of the concept token (reference rule: after noise and re-sort). Answer: greedy -> argmax;
  otherwise a draw from softmax(z / T_after) filtered with the after-thinking top-k/top-p/min-p
  (the intended behaviour); `answer_phase="legacy_argmax"` (soft modes) emits the thinking path's
  idx[0] instead, as every published number of both papers did.
  """
  z = z_BxV.astype(jnp.float32)
  t_after = params.temperature if params.after_temperature is None else params.after_temperature
  h = entropy(z, params.temperature, params.entropy_normalized)
  top_z, top_i = top_candidates(z, params.k_max(z.shape[-1]))
  q_think = filter_sorted(top_z, params.temperature, params.top_k, params.top_p, params.min_p)
  idx, w = concept_token(params, keys_B, top_i, q_think)
  if params.mode == "greedy":
    return Sampled(top_i[:, 0], idx, w, h)
  if params.mode == "sample":
    tok_think = categorical(fold_keys(keys_B, _THINK), top_i, q_think)
  else:
    tok_think = idx[:, 0]
  if params.soft and params.answer_phase == "legacy_argmax":
    tok_answer = tok_think
  else:
    q_answer = filter_sorted(
      top_z, t_after, params.after_top_k, params.after_top_p, params.after_min_p
    )
    tok_answer = categorical(fold_keys(keys_B, _ANSWER), top_i, q_answer)
  return Sampled(jnp.where(in_think_B, tok_think, tok_answer), idx, w, h)


def mix_embeddings(
  rows_BxKxD: jax.Array, w_BxK: jax.Array, out_dtype, accum_dtype=jnp.float32
) -> jax.Array:
  """e = sum_k w_k E[idx_k] / sum_k w_k from the K gathered rows E[idx] (never a [V, D] matmul).

  Accumulates in accum_dtype (f32 by default; the reference sums in the model dtype), then casts to
  out_dtype. A one-hot (idx, w) gives exactly the token's embedding. Works for bf16 tables.
  """
  rows = rows_BxKxD
  w = w_BxK.astype(accum_dtype)
  w = w / jnp.sum(w, axis=-1, keepdims=True)
  # Elementwise multiply-add, not an einsum: exact f32 on every backend (TPU einsums may use bf16).
  e = jnp.sum(w[..., None] * rows.astype(accum_dtype), axis=1)
  return e.astype(out_dtype)
