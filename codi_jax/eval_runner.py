"""One restored run decoded (and probed) in one mode over evaluation sets: per-example records
and each set's summary (`Runner`), the results table and the probe files (`write_probe`).

`codi_jax.eval_lib.evaluate` drives it over a run's modes and sets and keeps the results.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence

import numpy as np

from codi_jax import results
from codi_jax.batching import fixed_batches
from codi_jax.codi import probe
from codi_jax.codi.decoder import CodiDecoder
from codi_jax.codi.model import CodiOptions
from codi_jax.config_rules import Int, Str
from codi_jax.data import answers
from codi_jax.data.eval_sets import EvalData
from codi_jax.files import write_atomic, write_json
from codi_jax.final import FinishedRun
from codi_jax.models import memory
from codi_jax.options import option

SCORING = "exact float equality with the last number of the answer (the reference's test.py)"


@dataclasses.dataclass(frozen=True)
class ValidationOptions:
  """`config.eval`: validation during training (and a finished run's evaluation defaults)."""

  every_steps: int = option(Int(1, doc="steps between validations"))
  num_examples: int = option(Int(0, doc="validation examples; 0 = all"))
  batch_size: int = option(Int(1, doc="validation batch"))
  max_new_tokens: int = option(Int(1, doc="decoding cap"))
  baseline_note: str = option(Str(doc="text printed beside the final accuracies"))


# ------------------------------------------------------------------------------------ running


class Runner:
  """Greedy decoding (and probing) of one restored run in one mode, over many datasets."""

  def __init__(
    self,
    run: FinishedRun,
    mode: str,
    *,
    max_new_tokens: int,
    num_latent: int | None = None,
    padding_mode: str | None = None,
    mask_special: str = "all",
    buckets=None,
  ):
    if mode not in ("student", "teacher"):
      raise ValueError(f"mode must be student or teacher, got {mode!r}")
    self.run_, self.mode, self.max_new_tokens = run, mode, max_new_tokens
    opts = CodiOptions.from_config(run.config.codi, inference=True)
    if num_latent is not None:
      opts = dataclasses.replace(opts, num_latent=num_latent)
    if padding_mode is not None:
      opts = dataclasses.replace(opts, padding_mode=padding_mode)
    self.opts = opts
    self.thoughts = opts.num_latent if mode == "student" else 0
    self.decoder = CodiDecoder(
      run.codi,
      run.special,
      run.eos_ids,
      opts=opts,
      max_new_tokens=max_new_tokens,
      buckets=run.config.data.buckets if buckets is None else buckets,
      mask_special=mask_special,
    )

  def encode(self, questions: Sequence[str]) -> list[list[int]]:
    """Question ids with the tokenizer's own specials (BOS for Llama), as in training."""
    return [self.run_.tokenizer.encode(q, add_special_tokens=True) for q in questions]

  def run(
    self,
    data: EvalData,
    batch_size: int,
    *,
    probe_k: int = 0,
    probe_source: str = "pre_prj",
    progress: bool = True,
    records: results.Records | None = None,
  ) -> tuple[dict, list[dict], list[dict] | None]:
    """(summary, per-example records, per-example probe records or None) over `data`.

    `records` (a `results.Journal` for a resumable run) keeps what it already holds (those batches
    are not run again) and receives each batch as it finishes; the summary is computed from all of
    them, so a resumed run's equals an uninterrupted one's (its seconds and compiles add up).
    """
    records = results.Records() if records is None else records
    n = len(data.questions)
    batch_size = max(1, min(batch_size, n))
    questions = self.encode(data.questions)
    bucket = self.decoder.bucket(self.mode, questions)
    self.decoder.check_memory(questions, self.mode, batch_size)
    spent = {}

    def run(idx):
      compiles0, t0 = self.decoder.model.compiles_of(self.mode), time.perf_counter()
      rows = [questions[i] for i in idx]
      width = bucket(rows[0])
      decoded = self.decoder.decode_rows(rows, self.mode, width)
      tops = [None] * len(rows)
      if probe_k:
        tops = self.decoder.probe_rows(rows, width, k=probe_k, source=probe_source)
      out = [self._record(data, i, d, top) for i, d, top in zip(idx, decoded, tops)]
      compiles = self.decoder.model.compiles_of(self.mode) - compiles0  # decoding only
      spent["batch"] = (time.perf_counter() - t0, compiles)
      return out

    def on_batch(idx, recs):
      seconds, compiles = spent.pop("batch")
      records.append(zip(idx, recs), seconds=seconds, compiles=compiles)

    bar = f"{data.name} ({self.mode})" if progress and n > batch_size else None
    fixed_batches(
      list(range(n)),
      batch_size,
      run,
      bucket=lambda i: bucket(questions[i]),
      progress=bar,
      done=records.done,
      on_batch=on_batch,
    )
    recs = [records.done[i] for i in range(n)]
    examples = [r["example"] for r in recs]
    correct = sum(e["correct"] for e in examples)
    official = self.run_.run.get("official")
    summary = {
      "dataset": data.name,
      "source": data.report.get("source"),
      "task": data.task,
      "mode": self.mode,
      "method": self.run_.method,
      "workdir": None if official else os.path.dirname(self.run_.path),
      **({"official": official, "base": self.run_.run.get("base")} if official else {}),
      "n": n,  # rows used (the reader's report says how many were read and dropped)
      "correct": correct,
      "accuracy": correct / n,
      **(_scoring_report(examples, data.golds) if data.task == "math" else {}),
      "generated_tokens": sum(e["n_tokens"] for e in examples),
      "mean_generated_tokens": float(np.mean([e["n_tokens"] for e in examples])),
      "thoughts": self.thoughts,
      "padding_mode": self.opts.padding_mode,
      "max_new_tokens": self.max_new_tokens,
      "hit_max_new_tokens": sum(r["truncated"] for r in recs),
      "batch_size": batch_size,
      "eos_ids": self.decoder.eos_ids,
      "buckets": self.decoder.widths(questions, self.mode),
      "compiles": records.compiles,  # decoding only
      "eval_seconds": round(records.seconds, 3),
      "reader": data.report,
    }
    return summary, examples, ([r["probe"] for r in recs] if probe_k else None)

  def _record(self, data: EvalData, i: int, decoded, top) -> dict:
    """Problem `i`'s record: its example (and probe) as written out, and whether it hit the cap."""
    text = self.run_.tokenizer.decode(decoded.tokens, skip_special_tokens=True)
    pred = answers.extract_answer(text, data.task)
    example = {
      "index": i,
      "question": data.questions[i],
      "gold": jsonable(data.golds[i]),
      "prediction": text,
      "extracted": jsonable(pred),
      "correct": answers.is_correct(pred, data.golds[i]),
      "n_tokens": len(decoded.tokens),
      "tokens": decoded.tokens,
    }
    out = {"example": example, "truncated": decoded.truncated}
    if top is not None:
      out["probe"] = self._probe_record(example, data, *top)
    return out

  def _probe_record(self, example: dict, data: EvalData, probs, ids) -> dict:
    tok = self.run_.tokenizer
    tokens = [[tok.decode([int(t)], skip_special_tokens=False) for t in row] for row in ids]
    i = example["index"]
    return {
      "index": i,
      "question": example["question"],
      "gold": example["gold"],
      "prediction": example["prediction"],
      "correct": example["correct"],
      "cot": data.cots[i],
      "results": data.steps[i],
      "found": probe.match_steps(tokens, data.steps[i]),
      "tokens": tokens,
      "probs": [[round(float(p), 6) for p in row] for row in probs],
      "token_ids": [[int(t) for t in row] for row in ids],
    }

  def check_positions(self, data: EvalData, *, allow_extrapolation: bool = False) -> None:
    """InputError unless the longest question (as padded: slot positions in the official padding
    modes), its [bot], thoughts and [eot], and max_new_tokens fit the model's positions."""
    questions = self.encode(data.questions)
    student = self.mode == "student"
    if self.opts.padding_mode == "masked":
      longest = max(len(q) for q in questions)
      used = longest + (1 if student else 0)
    else:
      used = max(self.decoder.widths(questions, self.mode))
      longest = used - (1 if student else 0)
    used += self.thoughts + 1 if student else 0
    cfg = self.run_.codi.backbone.cfg
    prompt = f"the longest {data.name} question ({longest:,} tokens)"
    if student:
      prompt += f" + [bot] + {self.thoughts:,} thoughts + [eot]"
    if student and longest + 2 < cfg.max_positions:  # the thoughts leave no room
      fix = f"lower --num_latent to at most {cfg.max_positions - longest - 3:,} (one answer token)"
    else:
      fix = "evaluate shorter questions"
      model = self.run_.config.get("model")  # None for an official checkpoint (a loaded base)
      if model is not None and not model.get("spec"):  # from scratch: the table's size was chosen
        fix += ", or train with a larger --config.model.max_positions"
    memory.check_positions(
      cfg,
      used,
      self.max_new_tokens,
      allow_extrapolation=allow_extrapolation,
      what=f"--max_new_tokens ({data.name}, {self.mode})",
      prompt=prompt,
      fix=fix,
    )

  def latency(self, seqs: Sequence[Sequence[int]], batch_size: int, calls: int) -> dict:
    """Per-problem latency at batch 1 and at `batch_size` on the most common length bucket."""
    return self.decoder.latency(seqs, self.mode, batch_size, calls)


def jsonable(x):
  """`x` as written to JSON: a non-finite float (no number found) as null."""
  if isinstance(x, float) and not math.isfinite(x):
    return None  # no number in the text (the reference's inf)
  return x


def _scoring_report(examples: Sequence[dict], golds: Sequence) -> dict:
  """How math answers were scored, and what exact equality costs on non-integer golds.

  Scoring is the reference's (exact float equality); `near_misses` only reports wrong answers
  that equal the gold once both are rounded to 2 decimals (GSM-Hard's golds such as
  14053029.666666666 are rarely written out in full).
  """
  floats = [g for g in golds if isinstance(g, float) and math.isfinite(g)]
  near = sum(
    1
    for e, g in zip(examples, golds)
    if not e["correct"]
    and isinstance(e["extracted"], float)
    and isinstance(g, float)
    and math.isfinite(g)
    and round(e["extracted"], 2) == round(g, 2)
  )
  return {
    "scoring": SCORING,
    "non_integer_golds": sum(not g.is_integer() for g in floats),
    "near_misses": near,
  }


# ------------------------------------------------------------------------------------- output


def format_results(summaries: Sequence[dict]) -> str:
  """The per-dataset results as a text table."""
  head = (
    f"{'dataset':<16} | {'mode':<7} | {'n':>6} | {'accuracy':>8} | {'gen tokens':>10} | "
    f"{'per row':>7} | {'thoughts':>8} | {'compiles':>8} | {'seconds':>7}"
  )
  lines = [head, "-" * len(head)]
  notes = []
  for s in summaries:
    lines.append(
      f"{s['dataset']:<16} | {s['mode']:<7} | {s['n']:>6} | {100 * s['accuracy']:>7.2f}% | "
      f"{s['generated_tokens']:>10} | {s['mean_generated_tokens']:>7.2f} | {s['thoughts']:>8} | "
      f"{s['compiles']:>8} | {s['eval_seconds']:>7.1f}"
    )
    if s.get("non_integer_golds"):
      notes.append(
        f"{s['dataset']} ({s['mode']}): {s['non_integer_golds']} of {s['n']} golds are not "
        f"integers; scored by exact float equality as the reference; {s['near_misses']} wrong "
        "answers equal the gold at 2 decimals"
      )
  return "\n".join(lines + notes)


def write_probe(
  prefix: str, probes: Sequence[dict], *, source: str, k: int, include_wrong: bool
) -> dict:
  """Writes `<prefix>.probe.json` and `.probe.txt`; returns the Table-3 summary."""

  kept = [p for p in probes if include_wrong or p["correct"]]
  t3 = probe.table3(kept)
  meta = {
    "source": source,
    "top_k": k,
    "problems": ("all" if include_wrong else "correctly answered"),
    "match": "a step's reference result equals a top-k decoded token of any probed vector",
    "vectors": "bot + after each thought (pre-projection)"
    if source == "pre_prj"
    else "the projected thoughts",
  }
  write_json(prefix + ".probe.json", dict(**meta, table3=t3, examples=kept))
  blocks = [probe.format_problem(p, source) for p in kept]
  header = f"Table 3 ({meta['problems']}, top-{k}, {source}):\n{probe.format_table3(t3)}\n"
  write_atomic(prefix + ".probe.txt", header + "\n\n" + "\n\n".join(blocks) + "\n")
  return dict(**meta, table3=t3)
