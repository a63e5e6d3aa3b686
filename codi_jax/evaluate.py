r"""Evaluate a finished CODI run: accuracy per dataset, per-example JSONL, efficiency, probing.

  python -m codi_jax.evaluate --workdir=/tmp/codi_demo
  python -m codi_jax.evaluate --workdir=/tmp/codi_demo --cot_workdir=/tmp/cot --probe
  python -m codi_jax.evaluate --workdir=runs/gpt2 --data=gsm8k --data=svamp --data=multiarith
  python -m codi_jax.evaluate --workdir=runs/gpt2 --data=gsm8k=/data/gsm8k_test.jsonl --data=my.jsonl

The model, tokenizer and config come from `<workdir>/final` (written by `codi_jax.train`); an
optional --config replaces the saved `data`, `eval` and `seed` settings (which test set, batch
size, max_new_tokens). Decoding is greedy and jitted on fixed-shape batches (one compile per
question-length bucket): a CODI student encodes [question][bot], runs N continuous thoughts,
feeds [eot] and decodes the answer on the cache; a CoT-SFT model decodes CoT + answer from the
question; a No-CoT-SFT model is the student with 0 thoughts. Rows stop at eos (and the
tokenizer's other stop ids). Answers are extracted as the reference (spec 6.2).

Writes to <workdir>/eval (or --out), each file atomically:
  <dataset>.json            accuracy, n, mean generated tokens, thoughts, compiles, timing
  <dataset>.examples.jsonl  question, gold, prediction, extracted, correct, n_tokens per example
  <dataset>.efficiency.json tokens per problem, compression and latency (with --efficiency or
                            --cot_workdir; the CoT-SFT run is --cot_workdir)
  <dataset>.probe.json/.txt top-k decoded tokens of each thought and the Table-3 metric (--probe)
Files of a mode other than the model's own (--mode=teacher on a CODI run) get a `.teacher` /
`.student` suffix, and a --num_latent other than the trained one a `.latent<N>` suffix.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tokenizers
from absl import app, flags
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from codi_jax import runtime, train_lib
from codi_jax.codi import efficiency, inference, probe
from codi_jax.codi.model import Codi
from codi_jax.data import answers, readers, synthetic
from codi_jax.data.codi_batches import SpecialIds, bucket_size
from codi_jax.decoding import left_pad
from codi_jax.errors import InputError, exit_on_input_error
from codi_jax.models.tokenizer import Tokenizer

PROG = "codi_jax.evaluate"
MODES = ("auto", "student", "teacher", "both")


# ------------------------------------------------------------------------------------ loading


@dataclasses.dataclass
class Final:
  """A finished run restored from `<workdir>/final`."""

  codi: Codi
  tokenizer: Tokenizer
  special: SpecialIds
  config: ml_collections.ConfigDict  # the run's saved config
  run: dict  # run.json: special ids, stop ids, training summary
  path: str  # the final/ directory

  @property
  def method(self) -> str:
    return self.codi.cfg.method

  @property
  def eos_ids(self) -> list[int]:
    return sorted({int(self.special.eos), *(int(i) for i in self.run.get("eos_ids", []))})


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: cannot read ({e})") from None


def read_final(workdir: str) -> tuple[str, ml_collections.ConfigDict, dict]:
  """(final/ path, saved config, run.json) of a finished run, checked; nothing is built."""
  final = os.path.join(os.path.abspath(workdir), "final")
  if not os.path.isdir(final):
    if not os.path.isdir(workdir):
      raise InputError(f"{workdir}: no such directory")
    if os.path.isdir(final + ".tmp"):
      raise InputError(
        f"{workdir}: unfinished run (final.tmp/ but no final/: saving was interrupted)"
      )
    raise InputError(
      f"{workdir}: no finished run (no final/); train first: "
      f"python -m codi_jax.train --config=... --workdir={workdir}"
    )
  for name in ("config.json", "run.json", "tokenizer.json", "params"):
    if not os.path.exists(os.path.join(final, name)):
      raise InputError(f"{final}: incomplete checkpoint (no {name})")
  config = ml_collections.ConfigDict(_read_json(os.path.join(final, "config.json")))
  return final, config, _read_json(os.path.join(final, "run.json"))


def load_final(workdir: str) -> Final:
  """Model, tokenizer and config of a finished run; InputError (one line) if there is none."""
  final, config, run = read_final(workdir)
  try:
    special = SpecialIds(**run["special_ids"])
  except (KeyError, TypeError) as e:
    raise InputError(f"{final}/run.json: no valid special_ids ({e})") from None

  tok_path = os.path.join(final, "tokenizer.json")
  try:
    backend = tokenizers.Tokenizer.from_file(tok_path)
  except Exception as e:  # noqa: BLE001  (any load failure is reported in one line)
    raise InputError(f"{tok_path}: cannot load ({type(e).__name__}: {e})") from None
  with_specials = backend.encode("1", add_special_tokens=True).ids
  bos = with_specials[0] if len(with_specials) > len(backend.encode("1").ids) else None
  tokenizer = Tokenizer(
    backend, bos_id=bos, eos_id=special.eos, extra_eos_ids=run.get("eos_ids", ()), source=tok_path
  )

  if not config.model.spec:  # from scratch: the saved tokenizer already holds pad/bot/eot
    config.model.vocab_size = special.pad
  codi, tokenizer, built = train_lib.build_model(config, tokenizer)
  if built != special:
    raise InputError(f"{final}: rebuilt special ids {built} differ from run.json's {special}")
  params = nnx.state(codi, nnx.Param)
  try:
    with ocp.StandardCheckpointer() as ckpt:
      restored = ckpt.restore(os.path.join(final, "params"), nnx.to_pure_dict(params))
  except Exception as e:  # noqa: BLE001  (any load failure is reported in one line)
    first = (str(e).strip().splitlines() or [""])[0]
    raise InputError(
      f"{final}/params: does not match the model of config.json ({type(e).__name__}: {first})"
    ) from None
  nnx.replace_by_pure_dict(params, restored)
  nnx.update(codi, params)
  return Final(codi, tokenizer, special, config, run, final)


# ----------------------------------------------------------------------------------- datasets


@dataclasses.dataclass
class EvalData:
  """An evaluation set: questions, parsed golds and (for probing) each problem's reference steps."""

  name: str
  task: str  # math | commonsense | strategy (answer extraction)
  questions: list[str]
  golds: list
  steps: list[list[float | None]]  # reference intermediate results ([] when unknown)
  cots: list[str | None]
  report: dict


def config_task(config) -> str:
  return {"commonsense": "commonsense", "strategy": "strategy"}.get(config.data.source, "math")


def _synthetic(config, split: str, limit: int | None) -> EvalData:
  s = config.data.synthetic
  difficulty = synthetic.Difficulty.from_config(s.to_dict())
  size = s.test if split == "test" else s.valid
  recs = synthetic.generate(
    split, min(size, limit or size), seed=config.seed, difficulty=difficulty
  )
  return EvalData(
    f"synthetic_{split}",
    "math",
    [r["question"] for r in recs],
    [answers.gold_answer(r["answer"]) for r in recs],
    [list(map(float, r["results"])) for r in recs],
    [r["cot"] for r in recs],
    {"source": f"synthetic:{split} (seed {config.seed})", "read": len(recs), "kept": len(recs)},
  )


def _validation(config, limit: int | None) -> EvalData:
  recs = train_lib.load_records(config)[1][:limit]
  return EvalData(
    "valid",
    config_task(config),
    [r["question"] for r in recs],
    [answers.gold_answer(r["answer"]) for r in recs],
    [probe.reference_results(r) for r in recs],
    [r.get("cot") for r in recs],
    {"source": f"validation split of {config.data.source}", "read": len(recs), "kept": len(recs)},
  )


def _eval_set(
  name: str, out_name: str, source, task: str, limit: int | None, steps: bool
) -> EvalData:
  recs, rep = readers.read_eval_set(name, source, limit=limit)
  spec = readers.EVAL_SETS[name]
  rows = []
  if steps:  # a second pass for the raw CoT fields, which the eval-set reader does not keep
    rows = [
      row
      for _, row in zip(
        recs, readers.read_rows(source or spec.hub_id, splits=spec.splits, config=spec.config)
      )
    ]
  results = [probe.reference_results(r) for _, r in rows] if rows else [[] for _ in recs]
  cots = [r.get("cot") for _, r in rows] if rows else [None] * len(recs)
  return EvalData(
    out_name, task, [r["question"] for r in recs], [r["answer"] for r in recs], results, cots, rep
  )


def load_eval_data(spec: str, config, *, limit: int | None = None, steps: bool = False) -> EvalData:
  """One --data entry as an evaluation set.

  `spec` is `test` / `valid` (the run's own split), `synthetic:<split>`, an eval-set name (gsm8k,
  svamp, gsm-hard, multiarith, commonsense), `<name>=<file>[,<file>...]` (that set's field layout
  from local files), or a .json/.jsonl file with `question` and `answer` fields. `steps` also
  reads each problem's reference intermediate results (for probing).
  """
  source = config.data.source
  if spec == "test":
    if source == "synthetic":
      return _synthetic(config, "test", limit)
    default = {"gsm8k-aug": "gsm8k", "gsm8k-aug-nl": "gsm8k", "commonsense": "commonsense"}.get(
      source
    )
    if default is None:
      raise InputError(
        f"--data: no default test set for data.source={source!r}; pass --data=<file>"
      )
    return load_eval_data(default, config, limit=limit, steps=steps)
  if spec == "valid":
    return (
      _synthetic(config, "valid", limit) if source == "synthetic" else _validation(config, limit)
    )
  if spec.startswith("synthetic:"):
    split = spec.split(":", 1)[1]
    if split not in ("valid", "test"):
      raise InputError(f"--data={spec}: synthetic evaluation splits are valid and test")
    return _synthetic(config, split, limit)
  if spec in readers.EVAL_SETS:
    return _eval_set(spec, spec, None, readers.EVAL_SETS[spec].task, limit, steps)
  name, sep, files = spec.partition("=")
  if sep:
    if name not in readers.EVAL_SETS:
      raise InputError(
        f"--data={spec}: unknown evaluation set {name!r}; expected one of "
        f"{sorted(readers.EVAL_SETS)}"
      )
    paths = [p for p in files.split(",") if p]
    return _eval_set(name, name, paths, readers.EVAL_SETS[name].task, limit, steps)
  if not readers.is_local(spec):
    raise InputError(
      f"--data={spec}: not a .json/.jsonl file, and not one of test, valid, "
      f"synthetic:<split>, {', '.join(sorted(readers.EVAL_SETS))}"
    )
  # A plain file has the question/answer field names of GSM8k (or CommonsenseQA for its runs).
  fields = "commonsense" if config_task(config) == "commonsense" else "gsm8k"
  stem = os.path.splitext(os.path.basename(spec))[0]
  return _eval_set(fields, stem, spec, config_task(config), limit, steps)


# ------------------------------------------------------------------------------------ running


@dataclasses.dataclass
class Batch:
  """A fixed-shape batch: rows[:n] are real examples, the rest repeat them to keep the shape."""

  rows: np.ndarray  # [B] example indices
  n: int
  ids: np.ndarray  # [B, L] int32
  mask: np.ndarray  # [B, L] bool


def make_batches(
  seqs: Sequence[Sequence[int]], batch_size: int, buckets, pad_id: int, suffix: Sequence[int] = ()
) -> list[Batch]:
  """Left-padded batches of `seqs + suffix`, grouped by length bucket (one shape per bucket)."""

  groups: dict[int, list[int]] = {}
  for i, s in enumerate(seqs):
    groups.setdefault(bucket_size(len(s) + len(suffix), buckets), []).append(i)
  out = []
  for length in sorted(groups):
    idx = groups[length]
    for start in range(0, len(idx), batch_size):
      chunk = idx[start : start + batch_size]
      rows = np.resize(np.asarray(chunk, np.int64), batch_size)
      ids, mask = left_pad([list(seqs[r]) + list(suffix) for r in rows], pad_id, length)
      out.append(Batch(rows, len(chunk), ids, mask))
  return out


class Compiled:
  """`fn(codi, ids, mask)` under one jit: a compile per input shape, counted in `compiles`."""

  def __init__(self, codi, fn):
    self._graphdef, self._state = nnx.split(codi)
    self.compiles = 0

    def traced(state, ids, mask):
      self.compiles += 1  # trace time only
      return fn(nnx.merge(self._graphdef, state), ids, mask)

    self._jit = jax.jit(traced)

  def __call__(self, ids, mask):
    return self._jit(self._state, ids, mask)


class Runner:
  """Greedy decoding (and probing) of one restored run in one mode, over many datasets."""

  def __init__(
    self,
    final: Final,
    mode: str,
    *,
    max_new_tokens: int,
    num_latent: int | None = None,
    mask_special: str = "all",
    buckets=None,
  ):
    if mode not in ("student", "teacher"):
      raise ValueError(f"mode must be student or teacher, got {mode!r}")
    self.final, self.mode, self.max_new_tokens = final, mode, max_new_tokens
    self.buckets = final.config.data.buckets if buckets is None else buckets
    codi = nnx.merge(*nnx.split(final.codi))  # a copy sharing the arrays: the cfg may change below
    if num_latent is not None and mode == "student":
      codi.cfg = dataclasses.replace(codi.cfg, num_latent=num_latent)
    self.codi = codi
    self.thoughts = codi.cfg.num_latent if mode == "student" else 0
    sp = final.special
    suppress = {"all": (sp.pad, sp.bot, sp.eot), "eot_only": (sp.eot,)}[mask_special]
    kw = {
      "max_new": max_new_tokens,
      "eos_ids": final.eos_ids,
      "pad_id": sp.pad,
      "suppress": suppress,
    }
    if mode == "student":
      fn = functools.partial(inference.student_generate, eot_id=sp.eot, **kw)
    else:
      fn = functools.partial(inference.teacher_generate, **kw)
    self.decoder = Compiled(codi, fn)
    self._probes = {}

  def encode(self, questions: Sequence[str]) -> list[list[int]]:
    """Question ids with the tokenizer's own specials (BOS for Llama), as in training."""
    return [self.final.tokenizer.encode(q, add_special_tokens=True) for q in questions]

  def batches(self, seqs, batch_size: int) -> list[Batch]:
    suffix = (self.final.special.bot,) if self.mode == "student" else ()
    return make_batches(seqs, batch_size, self.buckets, self.final.special.pad, suffix)

  def prober(self, k: int, source: str) -> Compiled:
    if (k, source) not in self._probes:
      self._probes[k, source] = Compiled(
        self.codi, functools.partial(probe.probe_top_k, k=k, source=source)
      )
    return self._probes[k, source]

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

    tok = self.final.tokenizer
    n = len(data.questions)
    batch_size = max(1, min(batch_size, n))
    batches = self.batches(self.encode(data.questions), batch_size)
    prober = self.prober(probe_k, probe_source) if probe_k else None
    compiles0 = self.decoder.compiles
    examples: list[dict | None] = [None] * n
    probes: list[dict | None] = [None] * n
    truncated = 0
    t0 = time.perf_counter()
    bar = tqdm(
      total=n,
      desc=f"{data.name} ({self.mode})",
      unit="q",
      leave=False,
      dynamic_ncols=True,
      disable=(not progress or len(batches) < 2) or None,
    )
    for b in batches:
      toks, lens = jax.device_get(self.decoder(b.ids, b.mask))
      top = jax.device_get(prober(b.ids, b.mask)) if prober else None
      for j in range(b.n):
        i = int(b.rows[j])
        ids = toks[j, : lens[j]].tolist()
        truncated += int(lens[j] == self.max_new_tokens and ids[-1] not in self.final.eos_ids)
        text = tok.decode(ids, skip_special_tokens=True)
        pred = answers.extract_answer(text, data.task)
        ok = answers.is_correct(pred, data.golds[i])
        examples[i] = {
          "index": i,
          "question": data.questions[i],
          "gold": _jsonable(data.golds[i]),
          "prediction": text,
          "extracted": _jsonable(pred),
          "correct": ok,
          "n_tokens": int(lens[j]),
          "tokens": ids,
        }
        if top is not None:
          probes[i] = self._probe_record(examples[i], data, top[0][j], top[1][j])
      bar.update(b.n)
    bar.close()
    seconds = time.perf_counter() - t0
    correct = sum(e["correct"] for e in examples)
    summary = {
      "dataset": data.name,
      "source": data.report.get("source"),
      "task": data.task,
      "mode": self.mode,
      "method": self.final.method,
      "workdir": os.path.dirname(self.final.path),
      "n": n,
      "correct": correct,
      "accuracy": correct / n,
      "mean_generated_tokens": float(np.mean([e["n_tokens"] for e in examples])),
      "thoughts": self.thoughts,
      "padding_mode": self.codi.cfg.padding_mode,
      "max_new_tokens": self.max_new_tokens,
      "hit_max_new_tokens": truncated,
      "batch_size": batch_size,
      "eos_ids": self.final.eos_ids,
      "buckets": sorted({int(b.ids.shape[1]) for b in batches}),
      "compiles": self.decoder.compiles - compiles0,
      "eval_seconds": round(seconds, 3),
      "reader": data.report,
    }
    return summary, examples, (probes if prober else None)

  def _probe_record(self, example: dict, data: EvalData, probs, ids) -> dict:
    tok = self.final.tokenizer
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

    extra = 1 if self.mode == "student" else 0
    sizes = [bucket_size(len(s) + extra, self.buckets) for s in seqs]
    common = Counter(sizes).most_common(1)[0][0]
    pool = [s for s, size in zip(seqs, sizes) if size == common]
    out = {}
    for name, bs in (("batch1", 1), ("batched", batch_size)):
      chosen = [pool[i % len(pool)] for i in range((calls + 1) * bs)]
      inputs = [(b.ids, b.mask) for b in self.batches(chosen, bs)]
      out[name] = efficiency.time_calls(self.decoder, inputs, bs)
    out["question_bucket"] = common
    return out


def _jsonable(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None  # no number in the text (the reference's inf)
  return x


# ------------------------------------------------------------------------------------- output


def write_atomic(path: str, text: str):
  """Writes `text` to `path` through a temporary file in the same directory and a rename."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj):
  write_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str, rows: Sequence[dict]):
  write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


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
  num_latent = opts.num_latent
  if num_latent is None and method == "codi" and config.codi.get("num_latent_infer", -1) >= 0:
    num_latent = config.codi.num_latent_infer
  summaries, eff = [], None
  for mode in modes:
    runner = Runner(
      final,
      mode,
      max_new_tokens=max_new,
      num_latent=num_latent,
      mask_special=opts.mask_special,
      buckets=config.data.buckets,
    )
    suffix = "" if mode == own else f".{mode}"
    if mode == "student" and runner.thoughts != final.codi.cfg.num_latent:
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
  runner: Runner, cot: Final | None, data: EvalData, summary: dict, opts: Options
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
      buckets=runner.buckets,
    )
    cot_stats = stats(cot_runner, cot_runner.run(data, batch, progress=opts.progress)[0])
  return {
    "dataset": data.name,
    "n": summary["n"],
    **efficiency.report(stats(runner, summary), cot_stats),
  }


# ---------------------------------------------------------------------------------------- CLI

_CONFIG = _WORKDIR = None  # flag holders, set by _define_flags()


def _define_flags():
  """CLI flags, defined only when run as a program, so that importing this module defines none."""
  global _CONFIG, _WORKDIR  # pylint: disable=global-statement
  _CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Optional config (configs/*.py): its data, eval and seed settings replace the run's.",
  )
  _WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory holding final/ (from codi_jax.train)."
  )
  flags.DEFINE_multi_string(
    "data",
    [],
    "Dataset (repeatable): test | valid | synthetic:<split> | gsm8k | svamp | gsm-hard | "
    "multiarith | commonsense | <name>=<file>[,<file>] | <file>.json(l). Default: --split.",
  )
  flags.DEFINE_enum(
    "split", "test", ["test", "valid"], "The run's split to evaluate when --data is absent."
  )
  flags.DEFINE_enum(
    "mode",
    "auto",
    list(MODES),
    "auto: the student for codi / no_cot_sft runs, explicit CoT for cot_sft runs.",
  )
  flags.DEFINE_string("cot_workdir", None, "A CoT-SFT run to compare with (efficiency report).")
  flags.DEFINE_bool("efficiency", False, "Write the efficiency report (implied by --cot_workdir).")
  flags.DEFINE_integer("batch_size", None, "Evaluation batch (default: config.eval.batch_size).")
  flags.DEFINE_integer(
    "max_new_tokens", None, "Decoding cap (default: config.eval.max_new_tokens)."
  )
  flags.DEFINE_integer(
    "num_latent", None, "Continuous thoughts at inference (default: as configured)."
  )
  flags.DEFINE_integer(
    "limit", None, "First N examples per dataset (default: config.eval.num_examples)."
  )
  flags.DEFINE_string("out", None, "Output directory (default: <workdir>/eval).")
  flags.DEFINE_enum(
    "mask_special",
    "all",
    ["all", "eot_only"],
    "Never emit pad/bot/eot (all), or only eot (the reference's test.py).",
  )
  flags.DEFINE_bool("probe", False, "Decode each continuous thought through the LM head; Table 3.")
  flags.DEFINE_integer("probe_topk", 5, "Decoded tokens per probed vector.")
  flags.DEFINE_enum(
    "probe_source",
    "pre_prj",
    ["pre_prj", "post_prj"],
    "pre_prj: last hidden state before the projection (the paper); post_prj: the thoughts.",
  )
  flags.DEFINE_bool(
    "probe_all", False, "Probe every problem (default: only correctly answered ones)."
  )
  flags.DEFINE_integer(
    "latency_calls", 5, "Timed calls per latency figure, after one warm-up call."
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime.setup_cli()
  try:  # the config file loads lazily, on first access: a missing file or an error inside it
    override = None if _CONFIG.value is None else _CONFIG.value.copy_and_resolve_references()
  except OSError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    print(f"{PROG}: error: --config: {lines[-1] if lines else e}", file=sys.stderr)
    sys.exit(2)
  with exit_on_input_error(PROG):
    if not _WORKDIR.value:
      raise InputError("--workdir: required (the run directory holding final/)")
    fields = [f.name for f in dataclasses.fields(Options) if f.name not in ("workdir", "progress")]
    evaluate(Options(workdir=_WORKDIR.value, **{k: flags.FLAGS[k].value for k in fields}), override)


def _parse_flags(argv):
  """absl parsing; a bad flag, config file or config override is one line on stderr and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    message = lines[0] if len(lines) < 2 else f"{lines[0].rstrip(':')}: {lines[-1]}"
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    message = f"invalid config override {e} (overrides given: {', '.join(given) or 'none'})"
  print(f"{PROG}: error: {message}", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
