r"""Analyses of Soft Thinking (shared/spec/soft_thinking.md section 8), each writing CSV/JSON + PNG.

  python -m soft_jax.analyze js_probe --config=configs/soft/smollm2.py --steps=64 --out=/tmp/sa
  python -m soft_jax.analyze logit_lens --config=configs/soft/smollm2.py --steps=16 --out=/tmp/sa
  python -m soft_jax.analyze rouge --config=configs/soft/smollm2.py --max_new_tokens=64 --out=/tmp/sa
  python -m soft_jax.analyze randomness --config=configs/soft/smollm2.py --steps=32 --out=/tmp/sa

Prompts: --prompt (repeatable), else the first --limit problems of --data, else four built-in math
questions; each goes through the chat template with the math instruction (as `soft_jax.evaluate`).

js_probe (8.2): a soft trace of --steps steps (every step a thinking step: no Cold Stop, no
`</think>`); at each step the current concept token (idx, w) and its two counterfactuals, one-hot
idx[0] and one-hot idx[1] (idx[0] when w[1] = 0), run as one batch of 3B rows at the same position
on the same cache (the cache tiled 3x; the trajectory keeps the soft rows' cache). P = softmax(z/T)
over the full vocabulary before filtering, T the thinking temperature; logs JS(P1, Pst),
JS(P2, Pst), JS(P1, P2) per step. Writes js_probe.csv, js_probe.json, js_probe.png.

logit_lens (8.3): along the greedy trace, at each step with top-2 tokens t1, t2 of the next-token
distribution, feed alpha E[t1] + (1 - alpha) E[t2] (alpha = --lens_alpha, 0.6), E[t1] and E[t2] at
the same position on the same cache; at every layer project the hidden state to the vocabulary
(final norm if --lens_norm, then the LM head) and measure |top5(single) & top10(mix)| / 5 for both
single runs. Branching points: steps with p(t2) >= --lens_min_p2 (T = 1). Writes logit_lens.csv,
logit_lens.json, logit_lens.png.

rouge (8.4): ROUGE-L F1 on token ids (LCS, no stemming or tokenisation choices) of the first
--max_new_tokens tokens of each mode's trace (soft = per-step top-1 of the concept tokens; sample =
token sampling at the thinking temperature; dirichlet / gumbel likewise; all thinking, no phase
switch) against the greedy trace of the same prompt; --n_samples draws per stochastic mode.
Writes rouge.csv, rouge.json, rouge.png.

randomness (8.1): from the filtered candidate distributions q of a soft trace (--steps steps per
prompt), st = the vanilla concept token (top-K of q, renormalised) and st' = its noised version,
Dirichlet for each gamma in --gammas or Gumbel-Softmax for each tau in --taus (--draws draws per
step). randomness = JS(st', st) on probabilities (the reference applied a softmax to st' first:
--js_legacy_softmax reproduces it, for comparison only); softness = entropy of st'. Writes
randomness.csv, randomness.json, randomness.png.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from codi_jax import runtime
from codi_jax.errors import InputError, exit_on_input_error
from soft_jax import cli_common

ANALYSES = ("js_probe", "logit_lens", "rouge", "randomness")
DEFAULT_QUESTIONS = (
  (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
  ),
  (
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total "
    "does it take?"
  ),
  "What is the sum of all positive divisors of 36?",
  "If 3x + 7 = 22, what is the value of x?",
)

_STEPS = flags.DEFINE_integer(
  "steps", 64, "Soft steps per prompt (js_probe, logit_lens, randomness)."
)
_LENS_ALPHA = flags.DEFINE_float("lens_alpha", 0.6, "logit_lens: weight of t1 in the mixture.")
_LENS_NORM = flags.DEFINE_bool("lens_norm", True, "logit_lens: final norm before the LM head.")
_LENS_MIN_P2 = flags.DEFINE_float(
  "lens_min_p2", 0.1, "logit_lens: branching point if p(t2) >= this."
)
_ROUGE_MODES = flags.DEFINE_list(
  "rouge_modes", ["soft", "sample", "dirichlet", "gumbel"], "rouge: modes compared with greedy."
)
_GAMMAS = flags.DEFINE_list(
  "gammas", ["0.25", "0.5", "1", "2", "4", "8", "16", "64"], "randomness: Dirichlet gammas."
)
_TAUS = flags.DEFINE_list(
  "taus",
  ["0.1", "0.3", "0.5", "0.7", "0.9", "1.5", "3"],
  "randomness: Gumbel-Softmax temperatures.",
)
_DRAWS = flags.DEFINE_integer("draws", 8, "randomness: noise draws per step.")
_JS_LEGACY = flags.DEFINE_bool(
  "js_legacy_softmax", False, "randomness: JS(softmax(st'), st), the reference's bug (comparison)."
)

# ---------------------------------------------------------------------------------------------
# Pure metrics


def js_divergence(p, q, eps: float = 1e-10):
  """Jensen-Shannon divergence in nats over the last axis (<= ln 2); eps inside the logs (spec 8.2).

  Works on numpy or jax arrays (jax.numpy is used, the result is a jax array).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

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


def _tile(tree, n: int):
  """Repeats every batched leaf n times along axis 0 (scalars, e.g. cache.end, stay)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  return jax.tree.map(lambda x: jnp.concatenate([x] * n, axis=0) if x.ndim else x, tree)


def _rows(tree, start: int, stop: int):
  import jax  # pylint: disable=import-outside-toplevel

  return jax.tree.map(lambda x: x[start:stop] if x.ndim else x, tree)


def _probs(z, temperature):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  t = jnp.asarray(temperature, jnp.float32)
  t = jnp.where(t <= 0, 1.0, t)
  return jax.nn.softmax(z.astype(jnp.float32) / t, axis=-1)


def js_probe_trace(model, params, ids, mask, key, *, steps: int, sample_ids=None):
  """Soft trace with the three counterfactual forwards per step (jit-friendly; spec 8.2).

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
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from codi_jax.decoding import prefill  # pylint: disable=import-outside-toplevel
  from soft_jax import decode, sampling  # pylint: disable=import-outside-toplevel

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
    out = decode.soft_step(model, x, jnp.tile(pos, 3), _tile(cache, 3))
    z = out.logits.astype(jnp.float32)
    p = _probs(z, params.temperature).reshape(3, B, -1)
    js = jnp.stack(
      [js_divergence(p[0], p[2]), js_divergence(p[1], p[2]), js_divergence(p[0], p[1])], axis=-1
    )
    z_soft = z[2 * B :]
    s = sampling.sample_step(params, z_soft, sampling.fold_keys(keys, i + 1), think)
    top_z, top_i = sampling.top_candidates(z_soft, n_cand)
    rec = {"js": js, "token": idx[:, 0], "w": w, "top_z": top_z, "top_i": top_i}
    return (s.idx, s.w, pos + 1, _rows(out.cache, 2 * B, 3 * B)), rec

  _, recs = jax.lax.scan(body, (s0.idx, s0.w, pos, cache), jnp.arange(steps))
  return {k: jnp.swapaxes(v, 0, 1) for k, v in recs.items()}


def logit_lens_trace(model, ids, mask, alpha, *, steps: int, norm: bool = True):
  """Per-layer top-k overlap of a 2-token mixture with each single token along the greedy trace.

  Returns:
    dict of [B, steps, ...] arrays: overlap [.., L+1, 2] (|top5(t_j run) & top10(mix run)| / 5 at
    every hidden state, HF convention: 0 = embeddings, L = after the final norm), p1, p2 (softmax
    probabilities of t1, t2 at T = 1), t1, t2.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from codi_jax.decoding import prefill  # pylint: disable=import-outside-toplevel
  from soft_jax import decode, sampling  # pylint: disable=import-outside-toplevel

  B = ids.shape[0]
  L = model.cfg.num_layers
  logits, cache, pos = prefill(model, ids, mask, ids.shape[1] + steps)
  table = decode.embedding_table(model)
  dtype = jnp.dtype(model.cfg.dtype)

  def body(carry, _):
    logits, pos, cache = carry
    _, top2 = sampling.top_candidates(logits, 2)
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    p12 = jnp.take_along_axis(p, top2, axis=1)
    w_mix = jnp.broadcast_to(jnp.asarray([alpha, 1.0 - alpha], jnp.float32), (B, 2))
    x = jnp.concatenate(
      [
        sampling.mix_embeddings(table, top2[:, :1], jnp.ones((B, 1)), dtype),
        sampling.mix_embeddings(table, top2[:, 1:], jnp.ones((B, 1)), dtype),
        sampling.mix_embeddings(table, top2, w_mix, dtype),
      ]
    )
    out = decode.soft_step(model, x, jnp.tile(pos, 3), _tile(cache, 3), hidden_states=True)
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
    return (out.logits[:B], pos + 1, _rows(out.cache, 0, B)), rec

  _, recs = jax.lax.scan(body, (logits, pos, cache), None, length=steps)
  return {k: jnp.swapaxes(v, 0, 1) for k, v in recs.items()}


def noise_randomness(keys, top_z, params, *, noise: str, value, legacy_softmax: bool = False):
  """Randomness and softness of one noise setting on filtered candidate distributions (spec 8.1).

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
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from soft_jax import sampling  # pylint: disable=import-outside-toplevel

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


# ---------------------------------------------------------------------------------------------
# Drivers (host side): each returns its summary and writes files under out_dir


def _write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    if not rows:
      return
    wr = csv.DictWriter(f, fieldnames=list(rows[0]))
    wr.writeheader()
    wr.writerows(rows)


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt


def _save(plt, fig, out_dir: str, name: str) -> None:
  """`<out_dir>/<name>.png`, then closes the figure."""
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=100)
  plt.close(fig)


def _prepare(tokenizer, texts: Sequence[str], bucket_to: int = 8):
  """Chat-templated math prompts, left-padded to one width: (ids [B, P], mask [B, P])."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from codi_jax.decoding import bucket, left_pad  # pylint: disable=import-outside-toplevel
  from soft_jax.evaluate import prompt_ids  # pylint: disable=import-outside-toplevel

  rows = [prompt_ids(tokenizer, t, None) for t in texts]
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
  ids, mask = left_pad(rows, pad, bucket(max(len(r) for r in rows), bucket_to))
  return rows, jnp.asarray(ids), jnp.asarray(mask)


def _jit_model_fn(model, fn, **static):
  """jit(fn(model, *args)) with the model split once (weights as a traced argument)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from codi_jax.models.step import merge  # pylint: disable=import-outside-toplevel

  graphdef, state = nnx.split(model)
  f = jax.jit(lambda st, *a: fn(merge(graphdef, st), *a, **static))
  return lambda *a: f(state, *a)


def run_js_probe(
  model, tokenizer, texts, params, *, steps: int, seed: int, out_dir: str, trace: dict | None = None
) -> dict[str, Any]:
  """js_probe on every prompt; writes js_probe.csv / .json / .png; returns the summary."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  params = params.replace(mode=params.mode if params.soft else "soft")
  if trace is None:
    trace = probe_trace(model, tokenizer, texts, params, steps=steps, seed=seed)
  js = np.asarray(trace["js"])  # [B, S, 3]
  w = np.asarray(trace["w"])
  tokens = np.asarray(trace["token"])
  rows = []
  for b in range(js.shape[0]):
    for s in range(js.shape[1]):
      rows.append(
        {
          "prompt": b,
          "step": s,
          "token": int(tokens[b, s]),
          "token_text": tokenizer.decode([int(tokens[b, s])], skip_special_tokens=False),
          "w1": float(w[b, s, 0]),
          "w2": float(w[b, s, 1]) if w.shape[2] > 1 else 0.0,
          "js_top1_soft": float(js[b, s, 0]),
          "js_top2_soft": float(js[b, s, 1]),
          "js_top1_top2": float(js[b, s, 2]),
        }
      )
  _write_csv(os.path.join(out_dir, "js_probe.csv"), rows)
  names = ("js_top1_soft", "js_top2_soft", "js_top1_top2")
  summary = {
    "analysis": "js_probe",
    "steps_per_prompt": int(js.shape[1]),
    "prompts": len(texts),
    "temperature": params.temperature,
    "mode": params.mode,
    "max_topk": params.max_topk,
    "overall": {n: describe(js[..., i].ravel()) for i, n in enumerate(names)},
    "per_prompt": [
      {n: describe(js[b, :, i]) for i, n in enumerate(names)} for b in range(js.shape[0])
    ],
    # Steps whose concept token really mixes (w[1] > 0); elsewhere the top-2 input is the top-1.
    "mixed_steps": {n: describe(js[..., i][w[..., 1] > 0]) for i, n in enumerate(names)}
    if w.shape[2] > 1
    else None,
    "mean_w1": float(w[..., 0].mean()),
    "frac_js_top1_below_0.1": float((js[..., 0] < 0.1).mean()),
    "frac_js_top2_above_0.6": float((js[..., 1] > 0.6).mean()),
    "device": str(jax.devices()[0].device_kind),
  }
  _write_json(os.path.join(out_dir, "js_probe.json"), summary)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  bins = np.linspace(0, math.log(2), 41)
  for i, n in enumerate(names[:2]):
    ax.hist(js[..., i].ravel(), bins=bins, alpha=0.6, label=n.replace("_", " "))
  ax.set_xlabel("JS divergence (nats)")
  ax.set_ylabel("steps")
  ax.set_title(f"JS probe: {js.shape[0]} prompts x {js.shape[1]} soft steps")
  ax.legend()
  _save(plt, fig, out_dir, "js_probe")
  return summary


def probe_trace(model, tokenizer, texts, params, *, steps: int, seed: int) -> dict:
  """`js_probe_trace` on the prompts (jitted), as numpy arrays."""
  import jax  # pylint: disable=import-outside-toplevel

  _, ids, mask = _prepare(tokenizer, texts)
  fn = _jit_model_fn(model, js_probe_trace, steps=steps)
  out = fn(params, ids, mask, jax.random.key(seed))
  return jax.device_get(out)


def run_logit_lens(
  model, tokenizer, texts, *, steps: int, alpha: float, norm: bool, min_p2: float, out_dir: str
) -> dict[str, Any]:
  """logit_lens on every prompt; writes logit_lens.csv / .json / .png; returns the summary."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  _, ids, mask = _prepare(tokenizer, texts)
  fn = _jit_model_fn(model, logit_lens_trace, steps=steps, norm=norm)
  rec = jax.device_get(fn(ids, mask, alpha))
  ov = np.asarray(rec["overlap"])  # [B, S, L+1, 2]
  branch = np.asarray(rec["p2"]) >= min_p2  # [B, S]
  sel = ov[branch] if branch.any() else ov.reshape(-1, *ov.shape[2:])
  mean = sel.mean(axis=0)  # [L+1, 2]
  rows = [
    {
      "layer": layer,
      "overlap_t1": float(mean[layer, 0]),
      "overlap_t2": float(mean[layer, 1]),
      "overlap_t1_all_steps": float(ov[..., layer, 0].mean()),
      "overlap_t2_all_steps": float(ov[..., layer, 1].mean()),
    }
    for layer in range(ov.shape[2])
  ]
  _write_csv(os.path.join(out_dir, "logit_lens.csv"), rows)
  points = [
    {
      "prompt": int(b),
      "step": int(s),
      "t1": tokenizer.decode([int(rec["t1"][b, s])]),
      "t2": tokenizer.decode([int(rec["t2"][b, s])]),
      "p1": float(rec["p1"][b, s]),
      "p2": float(rec["p2"][b, s]),
    }
    for b, s in zip(*np.nonzero(branch))
  ]
  summary = {
    "analysis": "logit_lens",
    "alpha": alpha,
    "final_norm": norm,
    "min_p2": min_p2,
    "steps_per_prompt": steps,
    "prompts": len(texts),
    "branching_points": int(branch.sum()),
    "used_all_steps": not bool(branch.any()),
    "per_layer": rows,
    "points": points,
  }
  _write_json(os.path.join(out_dir, "logit_lens.json"), summary)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(mean[:, 0], marker="o", label="top-5 of t1 run in top-10 of mix")
  ax.plot(mean[:, 1], marker="s", label="top-5 of t2 run in top-10 of mix")
  ax.set_xlabel("hidden state (0 = embeddings)")
  ax.set_ylabel("overlap")
  ax.set_ylim(0, 1.05)
  ax.set_title(f"logit lens, mix {alpha:g}/{1 - alpha:g}, {int(branch.sum())} branching points")
  ax.legend()
  _save(plt, fig, out_dir, "logit_lens")
  return summary


def run_rouge(
  model,
  tokenizer,
  texts,
  params,
  *,
  modes: Sequence[str],
  max_new: int,
  n_samples: int,
  seed: int,
  out_dir: str,
) -> dict[str, Any]:
  """rouge: ROUGE-L F1 of each mode's trace vs greedy; writes rouge.csv / .json / .png."""
  from soft_jax import decode  # pylint: disable=import-outside-toplevel
  from soft_jax.sampling import MODES  # pylint: disable=import-outside-toplevel

  for m in modes:
    if m not in MODES or m == "greedy":
      raise InputError(f"--rouge_modes: unknown or greedy mode {m!r}")
  rows_ids, _, _ = _prepare(tokenizer, texts)
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
  # Every step is a thinking step: no Cold Stop, no budget, no `</think>`, no stop id.
  base = params.replace(cold_stop_entropy=0.0, max_thinking_tokens=0)

  def traces(mode, draws):
    dec = decode.SoftDecoder(model, base.replace(mode=mode), pad_id=pad, eos_ids=[-1])
    prompts = [r for r in rows_ids for _ in range(draws)]
    out = dec(prompts, max_new_tokens=max_new, seed=seed, length_bucket=8)
    return [o.tokens for o in out]

  greedy = traces("greedy", 1)
  rows = []
  for m in modes:
    draws = 1 if m == "soft" else n_samples
    for j, toks in enumerate(traces(m, draws)):
      b, d = divmod(j, draws)
      r = rouge_l(toks, greedy[b])
      rows.append(
        {
          "mode": m,
          "prompt": b,
          "draw": d,
          "f1": r["f1"],
          "precision": r["precision"],
          "recall": r["recall"],
          "tokens": len(toks),
        }
      )
  _write_csv(os.path.join(out_dir, "rouge.csv"), rows)
  by_mode = {m: describe([r["f1"] for r in rows if r["mode"] == m]) for m in modes}
  summary = {
    "analysis": "rouge",
    "level": "token ids",
    "max_new_tokens": max_new,
    "temperature": params.temperature,
    "max_topk": params.max_topk,
    "n_samples": n_samples,
    "prompts": len(texts),
    "rouge_l_f1": by_mode,
  }
  _write_json(os.path.join(out_dir, "rouge.json"), summary)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.boxplot([[r["f1"] for r in rows if r["mode"] == m] for m in modes])
  ax.set_xticks(range(1, len(modes) + 1), list(modes))
  ax.set_ylabel("ROUGE-L F1 vs greedy")
  ax.set_ylim(0, 1.05)
  ax.set_title(f"ROUGE-L vs greedy, {max_new} tokens, T={params.temperature:g}")
  _save(plt, fig, out_dir, "rouge")
  return summary


def run_randomness(
  top_z,
  params,
  *,
  gammas: Sequence[float],
  taus: Sequence[float],
  draws: int,
  seed: int,
  out_dir: str,
  legacy_softmax: bool = False,
) -> dict[str, Any]:
  """randomness/softness sweeps over candidate logits top_z [S, N]; writes randomness.*."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  top_z = jnp.asarray(top_z, jnp.float32)
  keys = jax.random.split(jax.random.key(seed), draws)
  fns = {
    n: jax.jit(
      lambda k, z, v, n=n: noise_randomness(
        k, z, params, noise=n, value=v, legacy_softmax=legacy_softmax
      )
    )
    for n in ("dirichlet", "gumbel")
  }
  rows = []
  for noise, values in (("dirichlet", gammas), ("gumbel", taus)):
    for v in values:
      rnd, soft = jax.device_get(fns[noise](keys, top_z, jnp.float32(v)))
      rows.append(
        {
          "noise": noise,
          "value": float(v),
          "randomness": float(np.mean(rnd)),
          "randomness_std": float(np.std(rnd)),
          "softness": float(np.mean(soft)),
          "softness_std": float(np.std(soft)),
        }
      )
  from soft_jax import sampling  # pylint: disable=import-outside-toplevel

  q = sampling.filter_sorted(top_z, params.temperature, params.top_k, params.top_p, params.min_p)
  _, w = sampling.cut(jnp.broadcast_to(jnp.arange(top_z.shape[1]), top_z.shape), q, params.max_topk)
  vanilla = float(jnp.mean(-jnp.sum(w * jnp.log(jnp.maximum(w, 1e-12)), axis=-1)))
  _write_csv(os.path.join(out_dir, "randomness.csv"), rows)
  summary = {
    "analysis": "randomness",
    "distributions": int(top_z.shape[0]),
    "draws": draws,
    "legacy_softmax": legacy_softmax,
    "vanilla_softness": vanilla,
    "rows": rows,
  }
  _write_json(os.path.join(out_dir, "randomness.json"), summary)
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, noise, label in ((axes[0], "dirichlet", "gamma"), (axes[1], "gumbel", "tau")):
    rs = [r for r in rows if r["noise"] == noise]
    x = [r["value"] for r in rs]
    ax.plot(x, [r["randomness"] for r in rs], marker="o", label="randomness JS(st', st)")
    ax.plot(x, [r["softness"] for r in rs], marker="s", label="softness H(st')")
    ax.axhline(vanilla, color="gray", ls="--", lw=1, label="H(st), vanilla")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("nats")
    ax.set_title(noise)
    ax.legend(fontsize=8)
  _save(plt, fig, out_dir, "randomness")
  return summary


# ---------------------------------------------------------------------------------------------
# CLI


def _floats(values: Sequence[str], flag: str, positive: bool = True) -> list[float]:
  out = []
  for v in values:
    try:
      x = float(v)
    except ValueError:
      raise InputError(f"{flag}: expected numbers, got {v!r}") from None
    if not math.isfinite(x) or (positive and x <= 0):
      raise InputError(f"{flag}: values must be finite and > 0, got {v!r}")
    out.append(x)
  if not out:
    raise InputError(f"{flag}: no value given")
  return out


def _texts() -> list[str]:
  if cli_common.PROMPT.value:
    return list(cli_common.PROMPT.value)
  if cli_common.DATA.value:
    from soft_jax import problems  # pylint: disable=import-outside-toplevel

    probs = problems.read_problems(
      cli_common.DATA.value,
      layout=cli_common.LAYOUT.value,
      question_field=cli_common.QUESTION_FIELD.value,
      answer_field=cli_common.ANSWER_FIELD.value,
      id_field=cli_common.ID_FIELD.value,
      limit=cli_common.LIMIT.value or 4,
    )
    return [p.question for p in probs]
  return list(DEFAULT_QUESTIONS[: cli_common.LIMIT.value or len(DEFAULT_QUESTIONS)])


def main(argv):
  runtime.setup_cli()
  with exit_on_input_error("soft_jax.analyze"):
    if len(argv) != 2 or argv[1] not in ANALYSES:
      raise InputError(
        f"expected one analysis, one of {', '.join(ANALYSES)}; got {' '.join(argv[1:]) or 'none'}"
      )
    name = argv[1]
    st = cli_common.settings(default_mode="soft")
    if st.mesh is not None:
      raise InputError("--mesh: the analyses run on one device (they are probes of a small model)")
    out_dir = cli_common.OUT.value
    if not out_dir:
      raise InputError("--out: no output directory given")
    if _STEPS.value < 1:
      raise InputError(f"--steps: must be >= 1, got {_STEPS.value}")
    if not 0 <= _LENS_ALPHA.value <= 1:
      raise InputError(f"--lens_alpha: must be in [0, 1], got {_LENS_ALPHA.value}")
    if _DRAWS.value < 1:
      raise InputError(f"--draws: must be >= 1, got {_DRAWS.value}")
    if cli_common.N_SAMPLES.value < 1:
      raise InputError(f"--n_samples: must be >= 1, got {cli_common.N_SAMPLES.value}")
    gammas = _floats(_GAMMAS.value or [], "--gammas")
    taus = _floats(_TAUS.value or [], "--taus")
    texts = _texts()
    try:
      os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
      raise InputError(f"--out: cannot create {out_dir}: {e.strerror}") from None
    from codi_jax.models import loader  # pylint: disable=import-outside-toplevel

    loaded = loader.load(st.model, dtype=st.dtype, param_dtype=st.dtype)
    model, tok = loaded.model, loaded.tokenizer
    params = st.params.validate(prefix="--", vocab=loaded.config.vocab_size)
    if name == "js_probe":
      summary = run_js_probe(
        model, tok, texts, params, steps=_STEPS.value, seed=st.seed, out_dir=out_dir
      )
    elif name == "logit_lens":
      summary = run_logit_lens(
        model,
        tok,
        texts,
        steps=_STEPS.value,
        alpha=_LENS_ALPHA.value,
        norm=_LENS_NORM.value,
        min_p2=_LENS_MIN_P2.value,
        out_dir=out_dir,
      )
    elif name == "rouge":
      summary = run_rouge(
        model,
        tok,
        texts,
        params,
        modes=_ROUGE_MODES.value,
        max_new=st.max_new_tokens,
        n_samples=cli_common.N_SAMPLES.value,
        seed=st.seed,
        out_dir=out_dir,
      )
    else:
      sp = params.replace(mode="soft")
      trace = probe_trace(model, tok, texts, sp, steps=_STEPS.value, seed=st.seed)
      top_z = trace["top_z"].reshape(-1, trace["top_z"].shape[-1])
      summary = run_randomness(
        top_z,
        sp,
        gammas=gammas,
        taus=taus,
        draws=_DRAWS.value,
        seed=st.seed,
        out_dir=out_dir,
        legacy_softmax=_JS_LEGACY.value,
      )
    summary.pop("per_prompt", None)
    summary.pop("points", None)
  print(json.dumps(summary)[:4000])
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
