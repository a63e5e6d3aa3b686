"""Pure, jit-friendly traces and metrics behind the Soft Thinking analyses (docs/soft_thinking.md,
analyses): JS divergence with counterfactual inputs, the logit lens at branching points, ROUGE-L,
and the randomness/softness of noised concept tokens. `soft_jax.analyze` drives, writes and plots.

Shape legend: B batch, P padded prompt length, S steps, K concept width, N candidates, V vocab,
L layers, R draws.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.decoding import prefill
from codi_jax.models import cache as kvc
from codi_jax.models.step import step
from soft_jax import decode, sampling

# ---------------------------------------------------------------------------------------------
# Metrics


def js_divergence(p, q, eps: float = 1e-10):
  """Jensen-Shannon divergence in nats over the last axis (<= ln 2); eps inside the logs (docs/soft_thinking.md 10.2).

  Works on numpy or jax arrays (jax.numpy is used, the result is a jax array).
  """
  p = jnp.asarray(p, jnp.float32)
  q = jnp.asarray(q, jnp.float32)
  m = 0.5 * (p + q)
  kl_pm = jnp.sum(p * (jnp.log(p + eps) - jnp.log(m + eps)), axis=-1)
  kl_qm = jnp.sum(q * (jnp.log(q + eps) - jnp.log(m + eps)), axis=-1)
  return jnp.maximum(0.5 * (kl_pm + kl_qm), 0.0)


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
  """Length of the longest common subsequence (O(len(a) len(b)) time, O(len(b)) memory)."""
  if not a or not b:
    return 0
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l(candidate: Sequence[Any], reference: Sequence[Any]) -> dict[str, float]:
  """ROUGE-L precision, recall and F1 (beta = 1) of two token sequences; all 0 if either is empty."""
  lcs = lcs_length(candidate, reference)
  if lcs == 0:
    return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
  p, r = lcs / len(candidate), lcs / len(reference)
  return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r)}


def cut_at_eos(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
  """`tokens` before the first EOS id (the stop id excluded); all of them when there is none."""
  eos = {int(e) for e in eos_ids}
  for i, t in enumerate(tokens):
    if int(t) in eos:
      return [int(x) for x in tokens[:i]]
  return [int(x) for x in tokens]


def before_eos(tokens, eos_ids: Sequence[int]) -> np.ndarray:
  """[B, S] bool: True at the steps before each row's first EOS id (the EOS step excluded)."""
  tokens = np.asarray(tokens)
  is_eos = np.isin(tokens, np.asarray(list(eos_ids), dtype=tokens.dtype))
  return np.cumsum(is_eos, axis=-1) == 0


def words(text: str) -> list[str]:
  """Words for word-level ROUGE-L: `text.split()`, i.e. split on runs of Unicode whitespace, with
  leading/trailing whitespace dropped; case, punctuation and everything else kept as decoded."""
  return text.split()


def describe(values: Sequence[float]) -> dict[str, float | int | None]:
  """n, mean, median, p10, p90, min, max of a list (None entries when empty)."""
  v = sorted(float(x) for x in values)
  if not v:
    return {
      "n": 0,
      "mean": None,
      "median": None,
      "p10": None,
      "p90": None,
      "min": None,
      "max": None,
    }

  def q(f):
    return v[min(len(v) - 1, int(f * (len(v) - 1) + 0.5))]

  return {
    "n": len(v),
    "mean": statistics.fmean(v),
    "median": statistics.median(v),
    "p10": q(0.1),
    "p90": q(0.9),
    "min": v[0],
    "max": v[-1],
  }


# ---------------------------------------------------------------------------------------------
# Jitted probes


def _probs(z, temperature):

  t = jnp.asarray(temperature, jnp.float32)
  t = jnp.where(t <= 0, 1.0, t)
  return jax.nn.softmax(z.astype(jnp.float32) / t, axis=-1)


def js_probe_trace(model, params, ids, mask, key, *, steps: int, sample_ids=None):
  """Soft trace with the three counterfactual forwards per step (jit-friendly; docs/soft_thinking.md 10.2).

  Args:
    model: The Transformer.
    params: SamplerParams (the trajectory follows its concept tokens; every step is thinking).
    ids: [B, P] left-padded prompts; mask: [B, P].
    steps: Soft steps.
    key: PRNG key; sample_ids [B] (default 0..B-1) seed each row.

  Returns:
    dict of [B, steps, ...] arrays: js [.., 3] (JS(P1, Pst), JS(P2, Pst), JS(P1, P2)), token (the
    trace token idx[0] of the step's input), w [.., K] its weights, top_z / top_i [.., N] the
    candidates of the soft run's next-token logits (for `randomness`).
  """

  B = ids.shape[0]
  K = params.max_topk
  n_cand = params.k_max(model.cfg.vocab_size)
  logits, cache, pos = prefill(model, ids, mask, ids.shape[1] + steps)
  sids = jnp.arange(B) if sample_ids is None else sample_ids
  keys = decode.row_keys(key, sids)
  think = jnp.ones((B,), bool)
  s0 = sampling.sample_step(params, logits, sampling.fold_keys(keys, 0), think)

  def body(carry, i):
    idx, w, pos, cache = carry
    second = idx[:, 1] if K > 1 else idx[:, 0]
    second = jnp.where(w[:, 1] > 0, second, idx[:, 0]) if K > 1 else second
    x = jnp.concatenate(
      [
        decode.embed_input(model, params, *sampling.one_hot_input(idx[:, 0], K)),
        decode.embed_input(model, params, *sampling.one_hot_input(second, K)),
        decode.embed_input(model, params, idx, w),
      ]
    )
    out = step(model, x[:, None], jnp.tile(pos, 3)[:, None], kvc.tile_rows(cache, 3))
    z = out.logits.astype(jnp.float32)
    p = _probs(z, params.temperature).reshape(3, B, -1)
    js = jnp.stack(
      [js_divergence(p[0], p[2]), js_divergence(p[1], p[2]), js_divergence(p[0], p[1])], axis=-1
    )
    z_soft = z[2 * B :]
    s = sampling.sample_step(params, z_soft, sampling.fold_keys(keys, i + 1), think)
    top_z, top_i = sampling.top_candidates(z_soft, n_cand)
    rec = {"js": js, "token": idx[:, 0], "w": w, "top_z": top_z, "top_i": top_i}
    return (s.idx, s.w, pos + 1, kvc.take_rows(out.cache, 2 * B, 3 * B)), rec

  _, recs = jax.lax.scan(body, (s0.idx, s0.w, pos, cache), jnp.arange(steps))
  return {k: jnp.swapaxes(v, 0, 1) for k, v in recs.items()}


def logit_lens_trace(model, ids, mask, alpha, *, steps: int, norm: bool = True):
  """Per-layer top-k overlap of a 2-token mixture with each single token along the greedy trace.

  Returns:
    dict of [B, steps, ...] arrays: overlap [.., L+1, 2] (|top5(t_j run) & top10(mix run)| / 5 at
    every hidden state, HF convention: 0 = embeddings, L = after the final norm), p1, p2 (softmax
    probabilities of t1, t2 at T = 1), t1, t2.
  """

  B = ids.shape[0]
  L = model.cfg.num_layers
  logits, cache, pos = prefill(model, ids, mask, ids.shape[1] + steps)
  dtype = jnp.dtype(model.cfg.dtype)

  def body(carry, _):
    logits, pos, cache = carry
    _, top2 = sampling.top_candidates(logits, 2)
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    p12 = jnp.take_along_axis(p, top2, axis=1)
    w_mix = jnp.broadcast_to(jnp.asarray([alpha, 1.0 - alpha], jnp.float32), (B, 2))
    x = jnp.concatenate(
      [
        sampling.mix_embeddings(model.embed.rows(top2[:, :1]), jnp.ones((B, 1)), dtype),
        sampling.mix_embeddings(model.embed.rows(top2[:, 1:]), jnp.ones((B, 1)), dtype),
        sampling.mix_embeddings(model.embed.rows(top2), w_mix, dtype),
      ]
    )
    out = step(
      model, x[:, None], jnp.tile(pos, 3)[:, None], kvc.tile_rows(cache, 3), hidden_states=True
    )
    per_layer = []
    for layer, h in enumerate(out.hidden_states):
      if norm and layer < L:
        h = model.final_norm(h)
      z = model.head(h).astype(jnp.float32)
      _, top5 = sampling.top_candidates(z[: 2 * B], 5)
      _, top10 = sampling.top_candidates(z[2 * B :], 10)
      hits = jnp.any(top5.reshape(2, B, 5, 1) == top10[None, :, None, :], axis=-1)  # [2, B, 5]
      per_layer.append(jnp.mean(hits.astype(jnp.float32), axis=-1).T)  # [B, 2]
    rec = {
      "overlap": jnp.stack(per_layer, axis=1),
      "p1": p12[:, 0],
      "p2": p12[:, 1],
      "t1": top2[:, 0],
      "t2": top2[:, 1],
    }
    return (out.logits[:B], pos + 1, kvc.take_rows(out.cache, 0, B)), rec

  _, recs = jax.lax.scan(body, (logits, pos, cache), None, length=steps)
  return {k: jnp.swapaxes(v, 0, 1) for k, v in recs.items()}


def noise_randomness(keys, top_z, params, *, noise: str, value, legacy_softmax: bool = False):
  """Randomness and softness of one noise setting on filtered candidate distributions (docs/soft_thinking.md 10.1).

  Args:
    keys: [R] typed keys (one per draw).
    top_z: [S, N] candidate logits sorted descending (one row per step).
    params: SamplerParams (thinking temperature / top-k / top-p / min-p and K).
    noise: "dirichlet" (value = gamma) or "gumbel" (value = tau).
    value: gamma or tau (may be traced).
    legacy_softmax: JS(softmax(st'), st), as the reference's metric (comparison only).

  Returns:
    (randomness [R, S], softness [R, S]): JS(st', st) and the entropy of st', in nats.
  """

  S, N = top_z.shape
  K = params.max_topk
  slots = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (S, N))
  q = sampling.filter_sorted(top_z, params.temperature, params.top_k, params.top_p, params.min_p)
  idx, w = sampling.cut(slots, q, K)
  rows = jnp.arange(S)[:, None]
  st = jnp.zeros((S, N)).at[rows, idx].add(w)

  def one(key):
    ks = jax.random.split(key, S)
    if noise == "dirichlet":
      i2, w2 = sampling.cut(slots, sampling.dirichlet_resample(ks, q, value), K, sorted_q=False)
    elif noise == "gumbel":
      i2, w2 = sampling.gumbel_softmax(ks, idx, w, value)
    else:
      raise ValueError(f"unknown noise {noise!r}")
    st2 = jnp.zeros((S, N)).at[rows, i2].add(w2)
    soft = -jnp.sum(st2 * jnp.log(jnp.maximum(st2, 1e-12)), axis=-1)
    a = jax.nn.softmax(st2, axis=-1) if legacy_softmax else st2
    return js_divergence(a, st), soft

  return jax.vmap(one)(keys)
