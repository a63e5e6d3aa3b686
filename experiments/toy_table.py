r"""The CODI paper's comparison at toy scale, seeded: six methods, a beta sweep, two tasks.

  python experiments/toy_table.py --task=arith --out=/tmp/toy_arith        # the built-in task
  python experiments/toy_table.py --task=mult4 --out=/tmp/toy_mult4        # 4x4 multiplication
  python experiments/toy_table.py --workers=2 --out=/tmp/toy_arith         # one run per core

Every method trains from scratch on the same config (configs/demo.py: 4 layers, d=128), the same
steps and batch, for every seed: No-CoT-SFT, CoT-SFT, CODI, CODI without distillation (beta=0),
Coconut and iCoT-SI; plus CODI at beta 5 and 20. Each run is evaluated on the task's test split
(never seen in training or validation): accuracy, generated tokens (thoughts counted), and for the
methods with continuous thoughts the probe's per-step match (Table 3 of the paper). The table
gives mean +- std over seeds, the compression (the CoT's tokens, from CoT-SFT minus No-CoT-SFT
generations, per thought) and the wall time of every run.

Tasks: `arith` is the built-in synthetic task of configs/demo.py (3 dependent operations, values
<= 30); `mult4` is iCoT's 4x4 multiplication, valid/test the released files (located through
tests/shared_data.py) and training pairs generated disjoint from them, one seed per method.

`--regime=pretrained_lora` runs the paper's regime instead: a base pretrained per seed on 1-2
operation problems, then CODI and the baselines fine-tuned from it, LoRA on the frozen base where the
paper uses it (experiments/pretrained_lora.py says what and why):

  python experiments/toy_table.py --regime=pretrained_lora --workers=2 --out=/tmp/toy_lora

A finished run is reused, an interrupted one resumes from its checkpoint, so the script can be
rerun until the table is complete. Writes <out>/table.md and <out>/results.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import pretrained_lora  # noqa: E402  (beside this file)
import toy_runs  # noqa: E402

from codi_jax import runtime  # noqa: E402
from codi_jax.errors import InputError, exit_on_input_error  # noqa: E402
from codi_jax.files import write_atomic, write_json  # noqa: E402

_TASK = flags.DEFINE_enum("task", "arith", ["arith", "mult4"], "Which task.")
_REGIME = flags.DEFINE_enum(
  "regime",
  "scratch",
  ["scratch", "pretrained_lora"],
  "scratch: every weight trained from scratch; pretrained_lora: the paper's regime, a base "
  "pretrained per seed then LoRA (experiments/pretrained_lora.py; arith only).",
)
_BASE_STEPS = flags.DEFINE_integer(
  "base_steps",
  None,
  f"pretrained_lora: steps of each base (default {pretrained_lora.DEFAULT_BASE_STEPS}).",
)
_ONE = flags.DEFINE_string(
  "one", None, "pretrained_lora, internal (what --workers starts): only run NAME:SEED, no table."
)
_OUT = flags.DEFINE_string("out", "/tmp/codi_toy", "Directory for the runs and the table.")
_STEPS = flags.DEFINE_integer(
  "steps",
  None,
  "Training steps of every run (the fixed budget; default: configs/demo.py's, "
  f"{pretrained_lora.DEFAULT_STEPS} for pretrained_lora).",
)
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds (default: 11,12,13 for arith, 11 for mult4).")
_METHODS = flags.DEFINE_list("methods", None, "Methods (default: every method of the table).")
_SWEEP_SEEDS = flags.DEFINE_integer(
  "sweep_seeds", None, "Run the beta sweep on the first N seeds only (default: every seed)."
)

_WORKERS = flags.DEFINE_integer(
  "workers",
  1,
  "Runs in parallel, each in a subprocess pinned to one core (Linux); 2 on a 2-core machine "
  "finished the arith table in 51 min (one 2-thread process: ~75, estimated). 1: all in this process.",
)

# name -> config.codi overrides (method first).
METHODS = {
  "no_cot_sft": {"method": "no_cot_sft"},
  "cot_sft": {"method": "cot_sft"},
  "codi": {"method": "codi"},
  "codi_no_distill": {"method": "codi", "beta": 0.0},  # the paper's "w/o L_KD" ablation
  "coconut": {"method": "coconut"},
  "icot_si": {"method": "icot_si"},
  "codi_beta5": {"method": "codi", "beta": 5.0},
  "codi_beta20": {"method": "codi", "beta": 20.0},
}
SWEEP = ("codi_beta5", "codi_beta20")  # every seed unless --sweep_seeds says fewer
THOUGHTS = ("codi", "codi_no_distill", "coconut", "codi_beta5", "codi_beta20")
# Relative run cost on the toy task (one-core minutes: No-CoT-SFT 1.5, CoT-SFT 2.8, CODI 5.4).
COST = {"no_cot_sft": 1, "cot_sft": 2, "icot_si": 2, "coconut": 3}


def base_config(task: str, steps: int | None):
  """configs/demo.py's model and optimizer, on the chosen task, for `steps` steps."""
  from configs import demo  # pylint: disable=import-outside-toplevel

  config = demo.get_config()
  steps = steps or config.optim.num_steps
  config.optim.num_steps = steps
  config.eval.every_steps = steps  # validation once, at the end
  config.checkpoint.every_steps = max(100, steps // 5)
  # Coconut: every stage (0..max_latent_stage, then all steps latent) gets an equal share.
  config.codi.stage_steps = max(1, steps // (config.codi.max_latent_stage + 2))
  if task == "mult4":
    import shared_data  # pylint: disable=import-outside-toplevel

    folder = shared_data.locate("multiplication", "4_by_4")
    if folder is None:
      raise InputError(
        f"the iCoT 4x4 multiplication files are not under {shared_data.data_root()}; set "
        f"{shared_data.ENV_ROOT} to a folder holding multiplication/4_by_4/{{valid,test}}.txt"
      )
    config.data.source = "multiplication"
    config.data.path = str(folder)
    config.data.multiplication.digits = 4
    # Digits one per token: the iCoT format spaces its digits, so " 7" pieces would otherwise merge.
    config.tokenizer = "train_bpe:1024"
    # CoT + answer: up to 108 tokens (every digit and every space is a token); 96 cut CoT-SFT off.
    config.eval.max_new_tokens = 128
    # iCoT-SI: the CoT is about twice as long as the arithmetic task's; remove twice as fast.
    config.codi.remove_per_epoch = 2 * config.codi.remove_per_epoch
  return config


def train_one(name: str, seed: int, base, out: str) -> tuple[str, dict]:
  """Trains (or resumes, or reuses) one run; returns (workdir, its summary)."""
  workdir = os.path.join(out, f"{name}_s{seed}")
  config = base.copy_and_resolve_references()
  config.seed = seed
  for k, v in METHODS[name].items():
    config.codi[k] = v
  if not os.path.exists(os.path.join(workdir, "final", "run.json")):
    print(f"== {name} seed {seed}: training", flush=True)
  return workdir, toy_runs.train_run(workdir, config)


def evaluate_one(name: str, workdir: str, max_new_tokens: int) -> dict:
  """Test accuracy, generated tokens, thoughts and (with thoughts) Table 3 of one finished run."""
  return toy_runs.evaluate_run(workdir, max_new_tokens, probe=name in THOUGHTS)


def table(rows: dict) -> str:
  """Markdown: one line per method, mean ± std over its seeds."""
  head = (
    "| method | seeds | test acc % | tokens/problem | thoughts | compression (CoT tokens / "
    "thoughts) | Table 3: step 1 / 2 / 3 % | train min/run |"
  )
  lines = [head, "|" + "---|" * 8]
  for name, c in toy_runs.shared_cells(rows).items():
    lines.append(
      f"| {name} | {len(rows[name])} | {c['acc']} | {c['tokens']} | {c['thoughts']} | "
      f"{c['comp']} | {c['t3']} | {c['minutes']} |"
    )
  return "\n".join(lines)


def split_methods(names: list[str], n: int) -> list[list[str]]:
  """Methods in n groups of about equal cost (longest first, each to the lightest group)."""
  groups: list[list[str]] = [[] for _ in range(n)]
  load = [0] * n
  for name in sorted(names, key=lambda m: -COST.get(m, 4)):
    k = load.index(min(load))
    groups[k].append(name)
    load[k] += COST.get(name, 4)
  return [g for g in groups if g]


def run_workers(names: list[str], n: int, out: str) -> None:
  """Trains and evaluates every run in n subprocesses, each pinned to its own core."""
  if not hasattr(os, "sched_setaffinity"):
    raise InputError(f"--workers={n}: pinning runs to cores needs Linux (os.sched_setaffinity)")
  cores = sorted(os.sched_getaffinity(0))
  if n > len(cores):
    raise InputError(f"--workers={n}: this process may use only {len(cores)} cores")
  passed = [f"--task={_TASK.value}", f"--out={out}"]
  for flag in (_STEPS, _SWEEP_SEEDS):
    if flag.value is not None:
      passed.append(f"--{flag.name}={flag.value}")
  if _SEEDS.value:
    passed.append(f"--seeds={','.join(_SEEDS.value)}")
  procs = []
  for k, group in enumerate(split_methods(names, n)):
    log = os.path.join(out, f"worker{k}.log")
    cmd = [sys.executable, os.path.abspath(__file__), *passed, f"--methods={','.join(group)}"]
    print(f"== worker {k} (core {cores[k]}): {', '.join(group)}; log {log}", flush=True)
    with open(log, "a", encoding="utf-8") as f:
      procs.append(
        (
          log,
          subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda c=cores[k]: os.sched_setaffinity(0, {c}),
          ),
        )
      )
  failed = [log for log, p in procs if p.wait() != 0]
  if failed:
    raise InputError(f"--workers: {len(failed)} worker(s) failed; see {', '.join(failed)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime.setup_cli()
  task = _TASK.value
  out = os.path.abspath(_OUT.value)
  seeds = [int(s) for s in (_SEEDS.value or (["11", "12", "13"] if task == "arith" else ["11"]))]
  names = _METHODS.value or list(METHODS)
  t_start = time.time()
  if _REGIME.value == "pretrained_lora":
    with exit_on_input_error("experiments/toy_table.py"):
      try:
        run_pretrained_lora(seeds, out, t_start)
      except KeyboardInterrupt as e:  # the runs checkpoint on the signal
        print(
          f"experiments/toy_table.py: {getattr(e, 'message', '') or 'interrupted'}; every "
          "finished run is kept: rerun the same command to resume",
          file=sys.stderr,
        )
        sys.exit(getattr(e, "code", 130))
    return
  with exit_on_input_error("experiments/toy_table.py"):
    unknown = [m for m in names if m not in METHODS]
    if unknown:
      raise InputError(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
    base = base_config(task, _STEPS.value)
    os.makedirs(out, exist_ok=True)
    if _WORKERS.value > 1:
      run_workers(names, _WORKERS.value, out)  # then the loop below only reads the finished runs
    rows = {}
    # Seed-major: an interrupted table already holds every method of the first seeds.
    sweep = seeds[: _SWEEP_SEEDS.value] if _SWEEP_SEEDS.value is not None else seeds
    plan = [(n, s) for s in seeds for n in names if s in sweep or n not in SWEEP]
    for name, seed in plan:
      workdir, summary = train_one(name, seed, base, out)
      row = {
        **evaluate_one(name, workdir, base.eval.max_new_tokens),
        "seed": seed,
        "wall_seconds": summary.get("wall_seconds") or 0.0,
      }
      row["train_seconds"] = summary.get("train_seconds", 0.0)
      rows.setdefault(name, []).append(row)
      print(f"== {name} seed {seed}: {json.dumps(row)}", flush=True)
      write_table(task, base, seeds, rows, out, t_start)
  write_table(task, base, seeds, rows, out, t_start, final=True)


def run_pretrained_lora(seeds: list[int], out: str, t_start: float) -> None:
  """--regime=pretrained_lora: bases, then every arm on them (experiments/pretrained_lora.py)."""
  pl = pretrained_lora
  names = _METHODS.value or list(pl.ARMS)
  unknown = [m for m in names if m not in pl.ARMS]
  if unknown:
    raise InputError(f"--methods: unknown {unknown}; choose from {sorted(pl.ARMS)}")
  if _TASK.value != "arith" or _SWEEP_SEEDS.value is not None:
    raise InputError("--regime=pretrained_lora: the arith task only, without --sweep_seeds")
  steps = _STEPS.value or pl.DEFAULT_STEPS
  base_steps = _BASE_STEPS.value or pl.DEFAULT_BASE_STEPS
  scratch = base_config("arith", steps)
  name, _, seed = (_ONE.value or "").partition(":")
  if _ONE.value and (name != "base" and name not in pl.ARMS or not seed.isdigit()):
    raise InputError(f"--one={_ONE.value}: expected NAME:SEED, NAME base or an arm")
  os.makedirs(out, exist_ok=True)
  if _ONE.value:
    if name == "base":
      pl.ensure_base(int(seed), out, base_steps)
    else:
      pl.run_one(name, int(seed), scratch, out, base_steps)
    return
  if _WORKERS.value > 1:
    passed = [f"--regime={_REGIME.value}", f"--out={out}", f"--steps={steps}"]
    passed.append(f"--base_steps={base_steps}")
    pl.run_parallel(
      pl.tasks_of(names, seeds),
      lambda t: pl.is_done(t, out),
      _WORKERS.value,
      lambda t: [sys.executable, os.path.abspath(__file__), *passed, f"--one={t[0]}:{t[1]}"],
      out,
    )  # then the loop below only reads the finished runs
  rows, bases = {}, {}
  for seed in seeds:  # seed-major: an interrupted table already holds the first seeds
    b = pl.ensure_base(seed, out, base_steps)
    bases[seed] = {k: v for k, v in b.items() if k.startswith("valid/") or k == "wall_seconds"}
    for name in names:
      row = pl.run_one(name, seed, scratch, out, base_steps)
      rows.setdefault(name, []).append(row)
      print(f"== {name} seed {seed}: test {100 * row['accuracy']:.1f}%", flush=True)
      pl.write_table(scratch, seeds, rows, bases, out, t_start)
  pl.write_table(scratch, seeds, rows, bases, out, t_start, final=True)


def write_table(task, cfg, seeds, rows, out, t_start, final=False):
  """Writes <out>/table.md and results.json (after every run: a partial table is readable)."""
  header = (
    f"Task {task}: {dict(cfg.data.synthetic) if task == 'arith' else 'iCoT 4x4 multiplication'};"
    f" model {cfg.model.arch} d={cfg.model.d_model} L={cfg.model.num_layers}; "
    f"{cfg.optim.num_steps} steps x batch {cfg.data.batch_size}; {cfg.codi.num_latent} CODI "
    f"thoughts; seeds {seeds}; {(time.time() - t_start) / 60:.0f} min this invocation."
  )
  text = table(rows)
  write_atomic(os.path.join(out, "table.md"), header + "\n\n" + text + "\n")
  write_json(os.path.join(out, "results.json"), {"config": cfg.to_dict(), "rows": rows})
  if final:
    print(header)
    print(text)


if __name__ == "__main__":
  app.run(main)
