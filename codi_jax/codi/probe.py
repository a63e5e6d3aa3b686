"""Probing CODI's continuous thoughts: decode each through the LM head, and the paper's Table 3.

As the reference `probe_latent_token.py` (docs/codi.md, probing), the default probes the **pre-projection**
last-layer hidden state (after the final norm) at [bot] and after each latent step: N+1 vectors,
each pushed through the LM head, softmaxed over every column, top-k. `source="post_prj"` probes the
N projected thoughts (the input embeddings actually fed back) instead.

Table 3 (decoded intermediate results matching the reference) has no released code; ours is:
a problem's step k is *matched* when its reference result (the value after `=` in the k-th
`<<a*b=c>>` step of the reference CoT, every step kept, so the last step's value is the answer)
equals, as a number, one of the top-k decoded tokens of *any* probed vector. The rate for step k
is matched / problems having at least k steps, over the problems probed (by default, as the
reference logs, only the correctly answered ones). Tokenizers that split numbers into digits
(e.g. `train_bpe`) can only match single-digit results.

Shape legend: B batch, Lq question(+bot) length, N thoughts, M probed vectors, D model, K top-k.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from codi_jax.codi.model import Codi, encode_and_think, question_slots
from codi_jax.data.readers import step_result
from codi_jax.models.positions import PaddingMode, positions
from codi_jax.models.transformer import Transformer

Source = Literal["pre_prj", "post_prj"]
SOURCES = ("pre_prj", "post_prj")
_NUMBER = re.compile(r"-?\d+\.?\d*|-?\.\d+")
_STEP = re.compile(r"<<[^<>]*>>")


# ----------------------------------------------------------------------------------- model side


def thought_states(
  codi: Codi,
  enc_ids_BxLq,
  enc_mask_BxLq,
  source: Source = "pre_prj",
  *,
  num_latent: int,
  padding_mode: PaddingMode = "masked",
):
  """The vectors to probe, [B, M, D] f32: M = N+1 pre-projection states or N projected thoughts.

  The thoughts come from `encode_and_think` (the evaluation path). The pre-projection states are
  recomputed from them: the [bot] state by the encoder pass again, the N latent-step states by
  teacher-forcing the thoughts at their cache slots, with the attention each latent step saw
  (question pads visible in the official padding modes).
  """
  if source not in SOURCES:
    raise ValueError(f"probe source must be one of {SOURCES}, got {source!r}")
  batch = {"encoder_ids": enc_ids_BxLq, "encoder_mask": enc_mask_BxLq}
  cache, next_pos, thoughts_NxBxD = encode_and_think(
    codi, batch, num_latent=num_latent, padding_mode=padding_mode, capacity_extra=0
  )
  thoughts = jnp.swapaxes(thoughts_NxBxD, 0, 1)
  if source == "post_prj":
    return thoughts
  backbone, official = codi.backbone, padding_mode != "masked"
  Lq = enc_ids_BxLq.shape[1]
  N = thoughts.shape[1]
  enc_pos = positions(enc_mask_BxLq, padding_mode)
  h_bot = backbone(enc_ids_BxLq, positions=enc_pos, mask=enc_mask_BxLq, logits="none").hidden
  h_bot = h_bot[:, -1:]
  if N == 0:
    return h_bot.astype(jnp.float32)
  valid = cache.valid | (question_slots(enc_mask_BxLq, cache.capacity)[None] & official)
  rewound = cache._replace(end=jnp.asarray(Lq, jnp.int32), valid=valid)
  pos = next_pos[:, None] - N + jnp.arange(N)[None]
  h = backbone(embeds=thoughts, positions=pos, cache=rewound, logits="none").hidden
  return jnp.concatenate([h_bot, h], 1).astype(jnp.float32)


def head_top_k(backbone: Transformer, vecs_BxMxD, k: int):
  """(probabilities [B, M, K], token ids [B, M, K]): softmax over the whole LM head, top-k."""
  probs = jax.nn.softmax(backbone.head(vecs_BxMxD.astype(jnp.dtype(backbone.cfg.dtype))), axis=-1)
  return jax.lax.top_k(probs, k)


def probe_top_k(
  codi: Codi,
  enc_ids_BxLq,
  enc_mask_BxLq,
  *,
  k: int = 5,
  source: Source = "pre_prj",
  num_latent: int,
  padding_mode: PaddingMode = "masked",
):
  """Top-k decoded tokens of every probed vector of each row: (probs, ids), both [B, M, K]."""
  states = thought_states(
    codi, enc_ids_BxLq, enc_mask_BxLq, source, num_latent=num_latent, padding_mode=padding_mode
  )
  return head_top_k(codi.backbone, states, k)


# ------------------------------------------------------------------------------------ Table 3


def token_value(text: str) -> float | None:
  """The number a decoded token spells (surrounding space and commas ignored), else None."""
  t = text.strip().replace(",", "")
  return float(t) if _NUMBER.fullmatch(t) else None


def reference_results(record: Mapping) -> list[float | None]:
  """Intermediate results of a record: its `results`, else the `<<..=c>>` steps of `cot`/`answer`.

  GSM8k-Aug and the synthetic task carry the steps in `cot`; GSM8k's test set annotates them
  inside `answer`. Records without steps (SVAMP, MultiArith) give [].
  """
  if record.get("results") is not None:
    return [None if r is None else float(r) for r in record["results"]]
  for key in ("cot", "answer"):
    steps = _STEP.findall(str(record.get(key) or ""))
    if steps:
      return [step_result(s) for s in steps]
  return []


def match_steps(
  top_tokens: Sequence[Sequence[str]], results: Sequence[float | None]
) -> list[list[int]]:
  """For each reference result, the indices of the probed vectors whose top-k contain it."""
  values = [{token_value(t) for t in tokens} for tokens in top_tokens]
  return [[m for m, vs in enumerate(values) if r is not None and r in vs] for r in results]


def table3(problems: Sequence[Mapping]) -> dict:
  """The Table-3 rates from per-problem `found` lists (see `match_steps`) of probed problems.

  Returns {problems, steps: [{step, problems, matched, rate}], all_steps: {problems, matched,
  rate}}; problems without reference steps are not counted; rates are None for no problems.
  """
  found = [p["found"] for p in problems if p["found"]]
  steps = []
  for k in range(max((len(f) for f in found), default=0)):
    have = [f for f in found if len(f) > k]
    hit = sum(bool(f[k]) for f in have)
    steps.append(
      {"step": k + 1, "problems": len(have), "matched": hit, "rate": _rate(hit, len(have))}
    )
  every = sum(all(f) for f in found)
  return {
    "problems": len(found),
    "steps": steps,
    "all_steps": {"problems": len(found), "matched": every, "rate": _rate(every, len(found))},
  }


def _rate(hit: int, n: int) -> float | None:
  return hit / n if n else None


# ------------------------------------------------------------------------------------- output


def thought_label(m: int, source: Source) -> str:
  """Name of probed vector m: pre-projection vectors start at [bot]; thoughts count from 1."""
  if source == "pre_prj":
    return "bot" if m == 0 else f"after thought {m}"
  return f"thought {m + 1}"


def format_problem(entry: Mapping, source: Source) -> str:
  """One readable block: header, question, reference steps, then each vector's top-k tokens."""
  status = "correct" if entry["correct"] else "wrong"
  lines = [
    f"problem {entry['index']} ({status}) gold={entry['gold']} prediction={entry['prediction']!r}",
    f"Q: {entry['question']}",
  ]
  if entry["results"]:
    marks = [
      f"{_num(r)} (found: {', '.join(thought_label(m, source) for m in f)})"
      if f
      else f"{_num(r)} (not found)"
      for r, f in zip(entry["results"], entry["found"])
    ]
    lines.append(f"reference results: {', '.join(marks)}")
  for m, (toks, probs) in enumerate(zip(entry["tokens"], entry["probs"])):
    cells = " ".join(f"{t!r}({p:.2f})" for t, p in zip(toks, probs))
    lines.append(f"  {thought_label(m, source)}: {cells}")
  return "\n".join(lines)


def format_table3(t3: Mapping) -> str:
  """Table 3 as text: one line per step and one for all steps."""
  lines = [f"{'step':>9} | {'problems':>8} | {'matched':>7} | rate"]
  rows = [(str(s["step"]), s) for s in t3["steps"]] + [("all", t3["all_steps"])]
  for name, s in rows:
    rate = "-" if s["rate"] is None else f"{100 * s['rate']:.1f}%"
    lines.append(f"{name:>9} | {s['problems']:>8} | {s['matched']:>7} | {rate}")
  return "\n".join(lines)


def _num(x: float | None) -> str:
  return "?" if x is None else (str(int(x)) if float(x).is_integer() else str(x))
