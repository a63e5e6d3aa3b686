"""CODI evaluation as a library: decode a finished run, or an official-layout checkpoint on its
base model, on evaluation sets (`python -m codi_jax.evaluate` is the command line over `evaluate`).

The two ways in (a trained workdir, an official checkpoint) meet in one `Options` check and one
loop of `eval_runner.Runner` over modes and sets; each set's records go to a `results.Journal` as
batches finish, so interrupted runs resume; the efficiency report is the loop's tail.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Sequence

import ml_collections

from codi_jax import config_rules, results, train_options
from codi_jax.codi import convert, efficiency, probe
from codi_jax.codi.model import CodiOptions
from codi_jax.config_rules import Bool, Enum, Int, Num, Seq, Str
from codi_jax.data.eval_sets import SET_NAMES, EvalData, load_eval_data, set_name
from codi_jax.decoding import PaddingMode
from codi_jax.errors import InputError
from codi_jax.eval_runner import Runner, format_results, jsonable, write_probe
from codi_jax.files import write_json, write_jsonl
from codi_jax.final import FinishedRun, load_final, read_final
from codi_jax.options import option, rules

MODES = ("auto", "student", "teacher", "both")
PADDING_MODES = typing.get_args(PaddingMode)


# ---------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Options:
  """What `python -m codi_jax.evaluate` does; each field is the flag of the same name."""

  workdir: str | None = option(Str(optional=True, doc="a finished run"), None)
  official: str | None = option(Str(optional=True, doc="an official-layout checkpoint"), None)
  base: str | None = option(
    Str(optional=True, doc="with --official: the base model's HF directory"), None
  )
  sets: Sequence[str] = option(Seq(Str(nonempty=True), doc="evaluation sets"), ())
  data_dir: str = option(Str(doc="folder of the named sets' files"), "")
  set_path: Sequence[str] = option(Seq(Str(nonempty=True), doc="NAME=FILE entries"), ())
  mode: str = option(Enum(MODES, doc="decoding mode"), "auto")
  cot_workdir: str | None = option(
    Str(optional=True, doc="a CoT-SFT run for the efficiency report"), None
  )
  efficiency: bool = option(Bool(doc="write the efficiency report"), False)
  batch_size: int | None = option(Int(1, optional=True, doc="evaluation batch"), None)
  max_new_tokens: int | None = option(Int(1, optional=True, doc="decoding cap"), None)
  num_latent: int | None = option(Int(0, optional=True, doc="thoughts at inference"), None)
  padding_mode: str | None = option(Enum(PADDING_MODES, optional=True), None)
  lora_rank: int | None = option(
    Int(0, optional=True, doc="with --official: expected LoRA rank"), None
  )
  lora_alpha: float | None = option(
    Num(gt=0, optional=True, doc="with --official: LoRA alpha"), None
  )
  dtype: str | None = option(
    Enum(("float32", "bfloat16"), optional=True, doc="with --official: dtype"), None
  )
  limit: int | None = option(Int(1, optional=True, doc="first N examples per set"), None)
  out: str | None = option(Str(optional=True, doc="output directory"), None)
  mask_special: str = option(
    Enum(("all", "eot_only"), doc="never emit pad/bot/eot, or only eot"), "all"
  )
  probe: bool = option(Bool(doc="decode each thought through the LM head"), False)
  probe_topk: int = option(Int(1, doc="decoded tokens per probed vector"), 5)
  probe_source: str = option(Enum(("pre_prj", "post_prj"), doc="probed vectors"), "pre_prj")
  probe_all: bool = option(Bool(doc="probe every problem"), False)
  latency_calls: int = option(Int(1, doc="timed calls per latency figure"), 5)
  progress: bool = option(Bool(doc="progress bars"), True)
  allow_extrapolation: bool = option(Bool(doc="decode past a RoPE model's positions"), False)
  overwrite: bool = option(
    Bool(doc="replace complete results of another evaluation, discard partial ones"), False
  )

  def check(self):
    """Every flag against its rule (declared on its field), then the rules between them."""
    config_rules.check_values(dataclasses.asdict(self), rules(Options), prefix="--")
    if bool(self.workdir) == bool(self.official):
      raise InputError(
        "pass either --workdir=<finished run> or --official=<checkpoint> --base=<HF model dir>"
      )
    if self.official and not self.base:
      raise InputError("--base: required with --official (the base model's HF directory)")
    for name in ("official", "base"):
      path = getattr(self, name)
      if self.official and not os.path.exists(path):
        raise InputError(f"--{name}={path}: no such file or directory")
    if self.official and not self.sets:
      raise InputError(
        f"--sets: required with --official, e.g. --sets=gsm8k --data_dir=<folder> "
        f"(names: {', '.join(SET_NAMES)}; or .json/.jsonl files)"
      )
    if not self.official:
      for name in ("base", "lora_rank", "lora_alpha", "dtype"):
        if getattr(self, name) is not None:
          raise InputError(f"--{name}: only with --official")
    if self.data_dir and not os.path.isdir(self.data_dir):
      raise InputError(f"--data_dir={self.data_dir}: no such directory")
    self.set_paths()

  def set_paths(self) -> dict[str, str]:
    """--set_path entries as {set name: file}; every name must be a named set listed in --sets."""
    listed = {set_name(s) for s in self.sets or ("test",)}
    paths = {}
    for entry in self.set_path:
      name, sep, path = entry.partition("=")
      key = set_name(name)
      if not sep or not path:
        raise InputError(f"--set_path={entry}: expected NAME=FILE, e.g. svamp=/data/SVAMP.json")
      if key is None:
        raise InputError(
          f"--set_path={entry}: unknown set {name!r}; expected one of {', '.join(SET_NAMES)}"
        )
      if key not in listed:
        raise InputError(f"--set_path={entry}: {key} is not in --sets")
      if key in paths:
        raise InputError(f"--set_path={entry}: {key} is given twice")
      paths[key] = path
    return paths


def _own_mode(method: str) -> str:
  return "teacher" if method in ("cot_sft", "icot_si") else "student"  # iCoT-SI: CoT internalized


def official_run(opts: Options) -> FinishedRun:
  """An official-layout checkpoint loaded as a run: the model on `opts.base` with the reference's
  special ids and LoRA settings; inference settings from its codi_config.json (a codi_jax.export)
  or else the reference's test.py (6 thoughts, padding_mode "official", batch 128, 256 new
  tokens)."""
  loaded = convert.load_official(
    opts.official,
    opts.base,
    lora_rank=opts.lora_rank,
    lora_alpha=opts.lora_alpha,
    dtype=opts.dtype or "float32",
  )
  s = loaded.settings
  ev = s.get("eval") or {}
  # An export records its run's method; baselines decode as their CODI-layout equivalent
  # (iCoT-SI: from the question alone; Coconut: thoughts without a projection, read off prj.*).
  method = {"icot_si": "cot_sft", "coconut": "codi"}.get(s.get("method"), s.get("method", "codi"))
  config = ml_collections.ConfigDict(
    {
      "seed": 0,
      "codi": {
        "method": method,
        "num_latent": s.get("num_latent", convert.DEFAULT_NUM_LATENT),
        "num_latent_infer": -1,
        "padding_mode": s.get("padding_mode", "official"),
        "use_prj": s["use_prj"],
        "prj_dim": s["prj_dim"],
        "prj_layernorm": s["prj_layernorm"],
      },
      "data": {"source": "official", "buckets": ev.get("buckets", 32)},
      "eval": {
        "batch_size": ev.get("batch_size", 128),
        "max_new_tokens": ev.get("max_new_tokens", 256),
        "num_examples": 0,
      },
    }
  )
  run = {
    "official": os.path.abspath(opts.official),
    "base": os.path.abspath(opts.base) if os.path.exists(opts.base) else opts.base,
    "settings": s,
    "eos_ids": list(loaded.tokenizer.eos_ids),
  }
  return FinishedRun(
    loaded.codi, loaded.tokenizer, loaded.special, config, run, os.path.abspath(opts.official)
  )


def _out_dir(opts: Options) -> tuple[str, str]:
  """(output directory, the hint an unusable one's error gives)."""
  if opts.out:
    return opts.out, ""
  if opts.official:
    path = os.path.abspath(opts.official)
    out = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "eval")
  else:
    out = os.path.join(opts.workdir, "eval")
  return out, "that is the default output directory; pass --out=<a writable directory>"


def _identity(
  final: FinishedRun, runner: Runner, data: EvalData, batch: int, opts: Options
) -> dict:
  """What one result depends on (`results.Journal`): a resume or a kept result must match it."""
  official = final.run.get("official")
  model = {"run": results.digest(final.run)}  # run.json: the training summary, or our settings
  if official:
    base = final.run.get("base")
    model.update(official=official, base=base, files=results.fingerprint(official))
    model["base_files"] = results.fingerprint(base)
  else:
    model["workdir"] = os.path.dirname(final.path)
  probing = opts.probe and runner.mode == "student"
  content = [data.questions, [jsonable(g) for g in data.golds]]
  return {
    "model": model,
    "settings": {
      "mode": runner.mode,
      "thoughts": runner.thoughts,
      "padding_mode": runner.opts.padding_mode,
      "max_new_tokens": runner.max_new_tokens,
      "mask_special": opts.mask_special,
      "batch_size": max(1, min(batch, len(data.questions))),
      "buckets": runner.decoder.buckets,
      "eos_ids": runner.decoder.eos_ids,
      "probe": {"top_k": opts.probe_topk, "source": opts.probe_source, "all": opts.probe_all}
      if probing
      else None,
    },
    "data": {
      "name": data.name,
      "task": data.task,
      "source": data.report.get("source"),
      "n": len(data.questions),
      "sha256": results.digest(content + ([data.cots, data.steps] if probing else [])),
    },
  }


def evaluate(opts: Options, override=None) -> dict:
  """Runs the evaluation `opts` describes; returns {results: [summary], efficiency: report or None}.

  `override` (a config) replaces a run's saved data, eval and seed settings. Each result's records
  are appended to its `results.Journal` as batches finish: a rerun resumes an interrupted result,
  keeps a complete one of the same evaluation, and refuses one of another (unless `opts.overwrite`).
  """
  opts.check()
  if override is not None:  # the settings it replaces, checked as a training config's
    train_options.validate_train(override, sections=("data", "eval", "seed"))
  cot_final = read_final(opts.cot_workdir) if opts.cot_workdir else None  # fail early
  saved = None if opts.official else read_final(opts.workdir)
  out_dir, hint = _out_dir(opts)
  out_dir = results.check_out(out_dir, hint=hint)  # before any data is read or model loaded
  paths = opts.set_paths()

  def load_sets(config, limit):
    return [
      load_eval_data(s, config, limit=limit, steps=opts.probe, data_dir=opts.data_dir, paths=paths)
      for s in (opts.sets or ["test"])
    ]

  if opts.official:
    datasets = load_sets(None, opts.limit)  # data errors before the (slow) model load
    final = official_run(opts)
    config = final.config
  else:
    _, config, _ = saved
    if override is not None:
      config.data, config.eval, config.seed = override.data, override.eval, override.seed
    datasets = load_sets(config, opts.limit or config.eval.num_examples or None)
    final = load_final(opts.workdir)
  batch = opts.batch_size or config.eval.batch_size
  max_new = opts.max_new_tokens or config.eval.max_new_tokens
  method = config.codi.method
  own = _own_mode(method)
  modes = {"auto": [own], "both": ["student", "teacher"]}.get(opts.mode, [opts.mode])
  if opts.probe and "student" not in modes:
    raise InputError(f"--probe: --mode={opts.mode} on a {method} run has no continuous thoughts")
  trained = CodiOptions.from_config(config.codi)
  runners = {
    mode: Runner(
      final,
      mode,
      max_new_tokens=max_new,
      num_latent=opts.num_latent,
      padding_mode=opts.padding_mode,
      mask_special=opts.mask_special,
      buckets=config.data.buckets,
    )
    for mode in modes
  }
  vocab = final.codi.backbone.cfg.vocab_size
  if opts.probe and opts.probe_topk > vocab:
    raise InputError(f"--probe_topk: got {opts.probe_topk}; expected <= {vocab}, the vocabulary")
  jobs, eff_job = [], None  # before any decoding: positions, and what the output holds already
  for mode, runner in runners.items():
    suffix = "" if mode == own else f".{mode}"
    if mode == "student" and runner.thoughts != trained.num_latent:
      suffix += f".latent{runner.thoughts}"
    if runner.opts.padding_mode != trained.padding_mode:
      suffix += f".{runner.opts.padding_mode}"
    for data in datasets:
      runner.check_positions(data, allow_extrapolation=opts.allow_extrapolation)
      identity = _identity(final, runner, data, batch, opts)
      journal = results.Journal(
        out_dir,
        data.name + suffix,
        identity,
        summary=data.name + suffix + ".json",
        total=len(data.questions),
        label=f"{data.name} ({mode})",
        overwrite=opts.overwrite,
      )
      jobs.append((runner, data, os.path.join(out_dir, data.name + suffix), journal))
    if mode == own and (opts.efficiency or cot_final is not None):
      path = os.path.join(out_dir, datasets[0].name + suffix + ".efficiency.json")
      cot_id = None
      if cot_final is not None:
        cot_id = {"final": cot_final[0], "run": results.digest(cot_final[2])}
      eff_id = {"result": jobs[-len(datasets)][3].identity, "cot": cot_id}
      eff_id["latency_calls"] = opts.latency_calls
      kept = results.read_complete(path, eff_id, overwrite=opts.overwrite)
      eff_job = (runner, len(jobs) - len(datasets), path, eff_id, kept)
  summaries, eff = [], None
  for runner, data, prefix, journal in jobs:
    summaries.append(_result(runner, data, prefix, journal, batch, opts))
  if eff_job is not None:
    runner, first, path, eff_id, eff = eff_job
    if eff is None:
      cot = load_final(opts.cot_workdir) if opts.cot_workdir else None
      eff = _efficiency(runner, cot, jobs[first][1], summaries[first], opts)
      eff = {**eff, "identity": eff_id}
      write_json(path, eff)
  print(format_results(summaries), flush=True)
  if eff is not None:
    print(efficiency.format_report(eff), flush=True)
  return {"results": summaries, "efficiency": eff}


def _result(
  runner: Runner, data: EvalData, prefix: str, journal: results.Journal, batch: int, opts: Options
) -> dict:
  """One set in one mode: kept if complete; else decoded (after what its journal holds), its files
  written and its summary last. Returns the summary."""
  probe_k = opts.probe_topk if opts.probe and runner.mode == "student" else 0
  name = os.path.basename(prefix)
  if journal.complete is not None:
    summary = journal.complete
    print(f"{name}: kept the complete result (--overwrite recomputes it)", file=sys.stderr)
  else:
    if journal.done:
      print(
        f"{name}: resuming after {len(journal.done)} of {len(data.questions)} problems recorded "
        f"in {journal.path}",
        file=sys.stderr,
        flush=True,
      )
    with journal:
      summary, examples, probes = runner.run(
        data, batch, probe_k=probe_k, probe_source=opts.probe_source, progress=opts.progress,
        records=journal,
      )  # fmt: skip
    if probes is not None:
      summary["probe"] = write_probe(
        prefix, probes, source=opts.probe_source, k=probe_k, include_wrong=opts.probe_all
      )
    write_jsonl(prefix + ".examples.jsonl", examples)
    summary = journal.finish(summary)  # last: a result with its summary is complete
  if "probe" in summary:
    print(
      f"{data.name}: Table 3 ({summary['probe']['problems']} problems)\n"
      f"{probe.format_table3(summary['probe']['table3'])}",
      flush=True,
    )
  return summary


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
