"""CODI evaluation as a library: decode a finished run on evaluation sets, score the answers,
write per-example records, the efficiency report and the probe (`python -m codi_jax.evaluate` is
the command line over `evaluate`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from codi_jax.codi import efficiency, probe
from codi_jax.codi.decoder import CodiDecoder
from codi_jax.codi.model import CodiOptions
from codi_jax.data import answers
from codi_jax.data.eval_sets import EvalData, load_eval_data
from codi_jax.errors import InputError
from codi_jax.files import write_atomic, write_json, write_jsonl
from codi_jax.final import FinishedRun, load_final, read_final

MODES = ("auto", "student", "teacher", "both")


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
    mask_special: str = "all",
    buckets=None,
  ):
    if mode not in ("student", "teacher"):
      raise ValueError(f"mode must be student or teacher, got {mode!r}")
    self.run_, self.mode, self.max_new_tokens = run, mode, max_new_tokens
    opts = CodiOptions.from_config(run.config.codi, inference=True)
    if num_latent is not None:
      opts = dataclasses.replace(opts, num_latent=num_latent)
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
  ) -> tuple[dict, list[dict], list[dict] | None]:
    """(summary, per-example records, per-example probe records or None) over `data`."""
    tok = self.run_.tokenizer
    n = len(data.questions)
    batch_size = max(1, min(batch_size, n))
    questions = self.encode(data.questions)
    compiles0 = self.decoder.model.compiles_of(self.mode)
    t0 = time.perf_counter()
    bar = f"{data.name} ({self.mode})" if progress and n > batch_size else None
    decoded = self.decoder.generate(questions, self.mode, batch_size, progress=bar)
    tops = None
    if probe_k:
      tops = self.decoder.probe(questions, batch_size, k=probe_k, source=probe_source)
    examples, probes = [], []
    for i, d in enumerate(decoded):
      text = tok.decode(d.tokens, skip_special_tokens=True)
      pred = answers.extract_answer(text, data.task)
      examples.append(
        {
          "index": i,
          "question": data.questions[i],
          "gold": _jsonable(data.golds[i]),
          "prediction": text,
          "extracted": _jsonable(pred),
          "correct": answers.is_correct(pred, data.golds[i]),
          "n_tokens": len(d.tokens),
          "tokens": d.tokens,
        }
      )
      if tops is not None:
        probes.append(self._probe_record(examples[i], data, *tops[i]))
    seconds = time.perf_counter() - t0
    correct = sum(e["correct"] for e in examples)
    summary = {
      "dataset": data.name,
      "source": data.report.get("source"),
      "task": data.task,
      "mode": self.mode,
      "method": self.run_.method,
      "workdir": os.path.dirname(self.run_.path),
      "n": n,
      "correct": correct,
      "accuracy": correct / n,
      "mean_generated_tokens": float(np.mean([e["n_tokens"] for e in examples])),
      "thoughts": self.thoughts,
      "padding_mode": self.opts.padding_mode,
      "max_new_tokens": self.max_new_tokens,
      "hit_max_new_tokens": sum(d.truncated for d in decoded),
      "batch_size": batch_size,
      "eos_ids": self.decoder.eos_ids,
      "buckets": sorted({self.decoder.inputs([q], self.mode)[0].shape[1] for q in questions}),
      "compiles": self.decoder.model.compiles_of(self.mode) - compiles0,  # decoding only
      "eval_seconds": round(seconds, 3),
      "reader": data.report,
    }
    return summary, examples, (probes if tops is not None else None)

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

  def latency(self, seqs: Sequence[Sequence[int]], batch_size: int, calls: int) -> dict:
    """Per-problem latency at batch 1 and at `batch_size` on the most common length bucket."""
    return self.decoder.latency(seqs, self.mode, batch_size, calls)


def _jsonable(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None  # no number in the text (the reference's inf)
  return x


# ------------------------------------------------------------------------------------- output


def format_results(summaries: Sequence[dict]) -> str:
  """The per-dataset results as a text table."""
  head = (
    f"{'dataset':<16} | {'mode':<7} | {'n':>6} | {'accuracy':>8} | {'gen tokens':>10} | "
    f"{'thoughts':>8} | {'compiles':>8} | {'seconds':>7}"
  )
  lines = [head, "-" * len(head)]
  for s in summaries:
    lines.append(
      f"{s['dataset']:<16} | {s['mode']:<7} | {s['n']:>6} | {100 * s['accuracy']:>7.2f}% | "
      f"{s['mean_generated_tokens']:>10.2f} | {s['thoughts']:>8} | {s['compiles']:>8} | "
      f"{s['eval_seconds']:>7.1f}"
    )
  return "\n".join(lines)


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


# ---------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Options:
  """What `python -m codi_jax.evaluate` does; each field is the flag of the same name."""

  workdir: str
  data: Sequence[str] = ()  # empty: [split]
  split: str = "test"
  mode: str = "auto"
  cot_workdir: str | None = None
  efficiency: bool = False
  batch_size: int | None = None
  max_new_tokens: int | None = None
  num_latent: int | None = None
  limit: int | None = None
  out: str | None = None
  mask_special: str = "all"
  probe: bool = False
  probe_topk: int = 5
  probe_source: str = "pre_prj"
  probe_all: bool = False
  latency_calls: int = 5
  progress: bool = True

  def check(self):
    for name in ("batch_size", "max_new_tokens", "limit", "probe_topk", "latency_calls"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise InputError(f"--{name}: must be >= 1, got {value}")
    if self.num_latent is not None and self.num_latent < 0:
      raise InputError(f"--num_latent: must be >= 0, got {self.num_latent}")


def _own_mode(method: str) -> str:
  return "teacher" if method == "cot_sft" else "student"


def evaluate(opts: Options, override=None) -> dict:
  """Runs the evaluation `opts` describes; returns {results: [summary], efficiency: report or None}.

  `override` (a config) replaces the run's saved data, eval and seed settings.
  """
  opts.check()
  _, config, _ = read_final(opts.workdir)
  if opts.cot_workdir:
    read_final(opts.cot_workdir)  # fail early
  if override is not None:
    config.data, config.eval, config.seed = override.data, override.eval, override.seed
  batch = opts.batch_size or config.eval.batch_size
  max_new = opts.max_new_tokens or config.eval.max_new_tokens
  limit = opts.limit or config.eval.num_examples or None
  method = config.codi.method
  own = _own_mode(method)
  modes = {"auto": [own], "both": ["student", "teacher"]}.get(opts.mode, [opts.mode])
  if opts.probe and "student" not in modes:
    raise InputError(f"--probe: --mode={opts.mode} on a {method} run has no continuous thoughts")
  out_dir = opts.out or os.path.join(opts.workdir, "eval")
  datasets = [
    load_eval_data(s, config, limit=limit, steps=opts.probe) for s in (opts.data or [opts.split])
  ]
  final = load_final(opts.workdir)
  cot = load_final(opts.cot_workdir) if opts.cot_workdir else None
  trained = CodiOptions.from_config(config.codi).num_latent
  summaries, eff = [], None
  for mode in modes:
    runner = Runner(
      final,
      mode,
      max_new_tokens=max_new,
      num_latent=opts.num_latent,
      mask_special=opts.mask_special,
      buckets=config.data.buckets,
    )
    suffix = "" if mode == own else f".{mode}"
    if mode == "student" and runner.thoughts != trained:
      suffix += f".latent{runner.thoughts}"
    for data in datasets:
      probe_k = opts.probe_topk if opts.probe and mode == "student" else 0
      summary, examples, probes = runner.run(
        data, batch, probe_k=probe_k, probe_source=opts.probe_source, progress=opts.progress
      )
      prefix = os.path.join(out_dir, data.name + suffix)
      if probes is not None:
        summary["probe"] = write_probe(
          prefix, probes, source=opts.probe_source, k=probe_k, include_wrong=opts.probe_all
        )
        print(
          f"{data.name}: Table 3 ({summary['probe']['problems']} problems)\n"
          f"{probe.format_table3(summary['probe']['table3'])}",
          flush=True,
        )
      write_jsonl(prefix + ".examples.jsonl", examples)
      write_json(prefix + ".json", summary)
      summaries.append(summary)
    if mode == own and (opts.efficiency or cot is not None):
      eff = _efficiency(runner, cot, datasets[0], summaries[-len(datasets)], opts)
      write_json(os.path.join(out_dir, datasets[0].name + suffix + ".efficiency.json"), eff)
  print(format_results(summaries), flush=True)
  if eff is not None:
    print(efficiency.format_report(eff), flush=True)
  return {"results": summaries, "efficiency": eff}


def _efficiency(
  runner: Runner, cot: FinishedRun | None, data: EvalData, summary: dict, opts: Options
) -> dict:
  """Tokens per problem and latency of `runner`'s model and (if given) the CoT-SFT run on `data`."""
  batch = summary["batch_size"]

  def stats(r: Runner, s: dict) -> dict:
    keys = (
      "workdir",
      "method",
      "mode",
      "accuracy",
      "thoughts",
      "mean_generated_tokens",
      "max_new_tokens",
      "hit_max_new_tokens",
    )
    return {
      **{k: s[k] for k in keys},
      "latency": r.latency(r.encode(data.questions), batch, opts.latency_calls),
    }

  cot_stats = None
  if cot is not None:
    if cot.method != "cot_sft":
      print(
        f"warning: --cot_workdir holds a {cot.method} run; decoding it with explicit CoT",
        file=sys.stderr,
      )
    cot_max_new = max(runner.max_new_tokens, cot.config.eval.max_new_tokens)
    cot_runner = Runner(
      cot,
      "teacher",
      max_new_tokens=cot_max_new,
      mask_special=opts.mask_special,
      buckets=runner.decoder.buckets,
    )
    cot_stats = stats(cot_runner, cot_runner.run(data, batch, progress=opts.progress)[0])
  return {
    "dataset": data.name,
    "n": summary["n"],
    **efficiency.report(stats(runner, summary), cot_stats),
  }
