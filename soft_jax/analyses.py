"""The Soft Thinking analyses as drivers: each runs its jitted trace (`soft_jax.traces`) on a model
and prompts, writes CSV + PNG, then its JSON summary (last: it marks a complete result) under an
output directory and returns the summary.
`python -m soft_jax.analyze` is the command line over these.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.batching import bucket_size, left_pad
from codi_jax.errors import InputError
from codi_jax.files import write_atomic, write_json
from codi_jax.models.jitted import JittedModel
from soft_jax import decode, plots, sampling, traces
from soft_jax.evaluate import prompt_ids
from soft_jax.sampling import MODES

# ---------------------------------------------------------------------------------------------
# Drivers (host side): each returns its summary and writes files under out_dir


def _write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  """`rows` (dicts with the same keys) as CSV, written atomically."""
  out = io.StringIO()
  if rows:
    wr = csv.DictWriter(out, fieldnames=list(rows[0]))
    wr.writeheader()
    wr.writerows(rows)
  write_atomic(path, out.getvalue())


def _write_summary(out_dir: str, name: str, summary: dict, identity: dict | None) -> dict:
  """`<out_dir>/<name>.json`, written after the analysis' other files: it marks a complete result
  (with `identity`, what it was computed from: `results.read_complete`)."""
  if identity is not None:
    summary = {**summary, "identity": identity}
  write_json(os.path.join(out_dir, f"{name}.json"), summary)
  return summary


def _prepare(tokenizer, texts: Sequence[str], bucket_to: int = 8):
  """Chat-templated math prompts, left-padded to one width: (ids [B, P], mask [B, P])."""

  rows = [prompt_ids(tokenizer, t, None) for t in texts]
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
  ids, mask = left_pad(rows, pad, bucket_size(max(len(r) for r in rows), bucket_to))
  return rows, jnp.asarray(ids), jnp.asarray(mask)


def _mean(x) -> float | None:
  return float(np.mean(x)) if np.size(x) else None


def run_js_probe(
  model,
  tokenizer,
  texts,
  params,
  *,
  steps: int,
  seed: int,
  out_dir: str,
  trace: dict | None = None,
  identity: dict | None = None,
) -> dict[str, Any]:
  """js_probe on every prompt; writes js_probe.csv / .json / .png; returns the summary.

  A row's steps end before its first EOS trace token (the EOS step and every later one are left
  out of the CSV, the statistics and the plot), as they would in a decode with a stop id.
  """
  params = params.replace(mode=params.mode if params.soft else "soft")
  if trace is None:
    trace = probe_trace(model, tokenizer, texts, params, steps=steps, seed=seed)
  js = np.asarray(trace["js"])  # [B, S, 3]
  w = np.asarray(trace["w"])
  tokens = np.asarray(trace["token"])
  keep = traces.before_eos(tokens, tokenizer.eos_ids)  # [B, S]
  rows = []
  for b, s in zip(*np.nonzero(keep)):
    rows.append(
      {
        "prompt": int(b),
        "step": int(s),
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
  kept = js[keep]  # [n, 3]
  # Steps whose concept token really mixes (w[1] > 0); elsewhere the top-2 input is the top-1.
  mixed = js[keep & (w[..., 1] > 0)] if w.shape[2] > 1 else None
  summary = {
    "analysis": "js_probe",
    "steps_per_prompt": int(js.shape[1]),
    "prompts": len(texts),
    "eos": "each row's steps end before its first EOS trace token (EOS step excluded)",
    "steps_kept": int(keep.sum()),
    "eos_step": [int(k.sum()) if not k.all() else None for k in keep],
    "temperature": params.temperature,
    "mode": params.mode,
    "max_topk": params.max_topk,
    "overall": {n: traces.describe(kept[:, i]) for i, n in enumerate(names)},
    "per_prompt": [
      {n: traces.describe(js[b, keep[b], i]) for i, n in enumerate(names)}
      for b in range(js.shape[0])
    ],
    "mixed_steps": {n: traces.describe(mixed[:, i]) for i, n in enumerate(names)}
    if mixed is not None
    else None,
    "mean_w1": _mean(w[..., 0][keep]),
    "frac_js_top1_below_0.1": _mean(kept[:, 0] < 0.1),
    "frac_js_top2_above_0.6": _mean(kept[:, 1] > 0.6),
    "device": str(jax.devices()[0].device_kind),
  }
  title = f"JS probe: {js.shape[0]} prompts, {int(keep.sum())} soft steps before EOS"
  plots.js_probe(kept, names[:2], title, os.path.join(out_dir, "js_probe.png"))
  return _write_summary(out_dir, "js_probe", summary, identity)


def probe_trace(model, tokenizer, texts, params, *, steps: int, seed: int) -> dict:
  """`js_probe_trace` on the prompts (jitted), as numpy arrays."""

  _, ids, mask = _prepare(tokenizer, texts)
  fn = JittedModel(model).jit(traces.js_probe_trace, static_argnames=("steps",))
  out = fn(params, ids, mask, jax.random.key(seed), steps=steps)
  return jax.device_get(out)


def run_logit_lens(
  model,
  tokenizer,
  texts,
  *,
  steps: int,
  alpha: float,
  norm: bool,
  min_p2: float,
  out_dir: str,
  identity: dict | None = None,
) -> dict[str, Any]:
  """logit_lens on every prompt; writes logit_lens.csv / .json / .png; returns the summary."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  _, ids, mask = _prepare(tokenizer, texts)
  fn = JittedModel(model).jit(traces.logit_lens_trace, static_argnames=("steps", "norm"))
  rec = jax.device_get(fn(ids, mask, alpha, steps=steps, norm=norm))
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
  title = f"logit lens, mix {alpha:g}/{1 - alpha:g}, {int(branch.sum())} branching points"
  plots.logit_lens(mean, title, os.path.join(out_dir, "logit_lens.png"))
  return _write_summary(out_dir, "logit_lens", summary, identity)


ROUGE_WORDS = (
  "tokenizer.decode(ids, skip_special_tokens=True).split(): words are the runs of non-whitespace "
  "characters of the decoded trace; case, punctuation and Unicode are kept as decoded"
)


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
  identity: dict | None = None,
) -> dict[str, Any]:
  """rouge: ROUGE-L of each mode's trace vs greedy, on token ids and on words; writes rouge.*.

  Every trace (greedy too) is cut before its first EOS id (the stop id excluded) before scoring;
  word level scores `traces.words` of the decoded cut trace (see ROUGE_WORDS).
  """

  for m in modes:
    if m not in MODES or m == "greedy":
      raise InputError(f"--rouge_modes: unknown or greedy mode {m!r}")
  rows_ids, _, _ = _prepare(tokenizer, texts)
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
  # Every step is a thinking step: no Cold Stop, no budget, no `</think>`; no stop id either, so
  # every row has one shape; the traces are cut at their first EOS here, on the host.
  base = params.replace(cold_stop_entropy=0.0, max_thinking_tokens=0)

  def decode_traces(mode, draws):
    dec = decode.SoftDecoder(model, base.replace(mode=mode), pad_id=pad, eos_ids=[-1])
    prompts = [r for r in rows_ids for _ in range(draws)]
    out = dec(prompts, max_new_tokens=max_new, seed=seed, length_bucket=8)
    return [traces.cut_at_eos(o.tokens, tokenizer.eos_ids) for o in out]

  def text_words(toks):
    return traces.words(tokenizer.decode(toks, skip_special_tokens=True))

  greedy = decode_traces("greedy", 1)
  greedy_words = [text_words(t) for t in greedy]
  rows = []
  for m in modes:
    draws = 1 if m == "soft" else n_samples
    for j, toks in enumerate(decode_traces(m, draws)):
      b, d = divmod(j, draws)
      tok = traces.rouge_l(toks, greedy[b])
      wds = text_words(toks)
      word = traces.rouge_l(wds, greedy_words[b])
      rows.append(
        {
          "mode": m,
          "prompt": b,
          "draw": d,
          "token_f1": tok["f1"],
          "token_precision": tok["precision"],
          "token_recall": tok["recall"],
          "word_f1": word["f1"],
          "word_precision": word["precision"],
          "word_recall": word["recall"],
          "tokens": len(toks),
          "greedy_tokens": len(greedy[b]),
          "words": len(wds),
          "greedy_words": len(greedy_words[b]),
        }
      )
  _write_csv(os.path.join(out_dir, "rouge.csv"), rows)
  f1 = {
    level: {m: [r[f"{level}_f1"] for r in rows if r["mode"] == m] for m in modes}
    for level in ("token", "word")
  }
  summary = {
    "analysis": "rouge",
    "levels": {"token": "token ids", "word": ROUGE_WORDS},
    "eos": "every trace, greedy included, is cut before its first EOS id (stop id excluded)",
    "max_new_tokens": max_new,
    "temperature": params.temperature,
    "max_topk": params.max_topk,
    "n_samples": n_samples,
    "prompts": len(texts),
    "greedy_tokens": [len(t) for t in greedy],
    "rouge_l_f1": {
      level: {m: traces.describe(v) for m, v in by_mode.items()} for level, by_mode in f1.items()
    },
  }
  boxes = {f"{m}\n{level}": f1[level][m] for m in modes for level in ("token", "word")}
  title = f"ROUGE-L vs greedy, {max_new} tokens cut at EOS, T={params.temperature:g}"
  plots.rouge(boxes, title, os.path.join(out_dir, "rouge.png"))
  return _write_summary(out_dir, "rouge", summary, identity)


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
  identity: dict | None = None,
) -> dict[str, Any]:
  """randomness/softness sweeps over candidate logits top_z [S, N]; writes randomness.*."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  top_z = jnp.asarray(top_z, jnp.float32)
  keys = jax.random.split(jax.random.key(seed), draws)
  fns = {
    n: jax.jit(
      lambda k, z, v, n=n: traces.noise_randomness(
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
  plots.randomness(rows, vanilla, os.path.join(out_dir, "randomness.png"))
  return _write_summary(out_dir, "randomness", summary, identity)
