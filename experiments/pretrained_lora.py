r"""The paper's regime at toy scale: a pretrained base per seed, frozen under LoRA for the CODI arms.

  python experiments/toy_table.py --regime=pretrained_lora --workers=2 --out=/tmp/toy_lora

Stage 1, per seed: configs/toy_base.py (the demo's model; CoT-SFT on 1-2 operation problems, never
the 3-step task) trained from scratch for --base_steps and exported as an HF directory,
<out>/base_s<seed>_hf (plain weights plus the tokenizer every arm of that seed then uses).
Stage 2, per seed, on that base, with the paper's data rule (data.include_last_cot=False):
- LoRA on the frozen base (r=128, alpha=32, dropout 0.1, the paper's values; CODI's projection
  trains too): CODI at beta 1 and 0.3, CODI w/o distillation (beta 0), No-CoT-SFT, CoT-SFT;
- all weights, as their references train: iCoT-SI from the base; Coconut from the CoT-SFT run of the
  same seed (exported with LoRA merged, <out>/cot_sft_s<seed>_hf), as the reference's Coconut loads
  its CoT stage: codi.coconut_start_stage=1 (the reference's `resume`), so that CoT-SFT run is its
  stage 0 and step 1 trains stage 1; the stages keep toy_table's length (a fifth of the steps), so
  on the task's 3-step CoTs the all-latent stages 3-4 get the last three fifths.

Every CODI run also reports its teacher mode (the same weights given the explicit CoT) on the test
split and validation, and the per-layer distillation distance (training, last logged step; test:
experiments/distill_probe.py), so a collapsing teacher shows. The CODI beta is chosen on
validation; the verdict follows issue 23's criteria, stated before the runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import toy_runs

from codi_jax.errors import InputError
from codi_jax.files import write_atomic, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_STEPS = 3000
DEFAULT_BASE_STEPS = 2000
# The paper's GPT-2 runs use r=128 on d=768 (a sixth of the width) with alpha/r = 0.25; r=128 on
# this d=128 model would be full rank, so the same ratios: r = d/6 rounded, alpha = r/4.
LORA = {"lora_rank": 21, "lora_alpha": 5.25, "lora_dropout": 0.1}


@dataclasses.dataclass(frozen=True)
class Arm:
  codi: dict  # config.codi overrides
  lora: bool  # True: LoRA on the frozen init; False: every weight trains
  init: str  # "base" | "cot_sft" (that arm's run of the same seed)


ARMS = {
  "no_cot_sft": Arm({"method": "no_cot_sft"}, True, "base"),
  "cot_sft": Arm({"method": "cot_sft"}, True, "base"),
  "codi": Arm({"method": "codi", "beta": 1.0}, True, "base"),
  "codi_beta0.3": Arm({"method": "codi", "beta": 0.3}, True, "base"),
  "codi_no_distill": Arm({"method": "codi", "beta": 0.0}, True, "base"),
  "coconut": Arm({"method": "coconut"}, False, "cot_sft"),
  "icot_si": Arm({"method": "icot_si"}, False, "base"),
}
CODI_ARMS = ("codi", "codi_beta0.3", "codi_no_distill")
CANDIDATES = ("codi", "codi_beta0.3")  # the beta picked on validation among these
THOUGHTS = (*CODI_ARMS, "coconut")
# Relative one-core cost per step (README's from-scratch runs); the base stage is CoT-SFT.
COST = {"no_cot_sft": 1, "cot_sft": 2, "icot_si": 2, "coconut": 3, "base": 2}


def base_stage_config(seed: int, steps: int):
  """configs/toy_base.py for `seed` and `steps`."""
  from configs import toy_base  # pylint: disable=import-outside-toplevel

  config = toy_base.get_config()
  config.seed = seed
  config.optim.num_steps = steps
  config.eval.every_steps = max(1, steps // 4)
  config.checkpoint.every_steps = max(100, steps // 4)
  return config


def workdir_of(out: str, name: str, seed: int) -> str:
  return os.path.join(out, f"{name}_s{seed}")


def export_dir(out: str, name: str, seed: int) -> str:
  """The HF directory an arm starts from: <out>/base_s<seed>_hf or <out>/cot_sft_s<seed>_hf."""
  return os.path.join(out, f"{name}_s{seed}_hf")


def arm_config(scratch, name: str, seed: int, out: str):
  """`scratch` (experiments/toy_table.py's config of the task and budget) as arm `name` of `seed`,
  started from its init's export."""
  arm = ARMS[name]
  config = scratch.copy_and_resolve_references()
  config.seed = seed
  config.codi.update(arm.codi)
  config.data.include_last_cot = False  # the paper's data rule
  config.tokenizer = "model"  # the base's
  config.model.spec = export_dir(out, arm.init, seed)
  config.model.update(LORA)
  if not arm.lora:
    config.model.lora_rank = 0
  if arm.init == "cot_sft":
    config.codi.coconut_start_stage = 1  # that CoT-SFT run was stage 0
  steps = config.optim.num_steps
  config.eval.every_steps = max(1, steps // 5)  # a validation curve: has it stopped rising?
  config.eval.baseline_note = ""  # the demo's from-scratch figure does not apply
  # iCoT-SI: the demo's removal pace (a token every 25 steps in 800) stretched to the budget, as
  # toy_table stretches Coconut's stages.
  config.codi.remove_per_epoch = scratch.codi.remove_per_epoch * 800 / steps
  return config


def _exported(path: str) -> bool:
  from codi_jax import export  # pylint: disable=import-outside-toplevel

  return os.path.isfile(os.path.join(path, export.MARKER))


def ensure_export(workdir: str, out_dir: str) -> str:
  """`workdir`'s finished run exported to `out_dir` (kept when already there)."""
  from codi_jax import export  # pylint: disable=import-outside-toplevel

  if not _exported(out_dir):
    export.export(workdir, out_dir)
  return out_dir


def ensure_base(seed: int, out: str, base_steps: int) -> dict:
  """The base of `seed`: trained (or resumed, or reused) and exported; its training summary."""
  workdir = workdir_of(out, "base", seed)
  if not os.path.exists(os.path.join(workdir, "final", "run.json")):
    print(f"== base seed {seed}: training", flush=True)
  summary = toy_runs.train_run(workdir, base_stage_config(seed, base_steps))
  ensure_export(workdir, export_dir(out, "base", seed))
  return summary


def _distill_probe(workdir: str) -> dict:
  """experiments/distill_probe.py on the run's test split (cached in its folder)."""
  path = os.path.join(workdir, "distill_probe.json")
  if not os.path.exists(path):
    cmd = [sys.executable, os.path.join(HERE, "distill_probe.py"), f"--workdir={workdir}"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
      last = (r.stderr.strip().splitlines() or ["no output"])[-1]
      raise InputError(f"distill_probe on {workdir} failed: {last}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _logged(workdir: str) -> tuple[list[dict], dict | None]:
  """(validation records, the last logged per-layer distillation terms {step, terms}) from
  metrics.jsonl."""
  valid, per_layer = [], None
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      if any(k.startswith("valid/") for k in rec):
        valid.append({k: v for k, v in rec.items() if k == "step" or k.endswith("_acc")})
      terms = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in rec.items() if "per_layer/" in k)
      if terms:
        per_layer = {"step": rec["step"], "terms": [v for _, v in terms]}
  return valid, per_layer


def run_one(name: str, seed: int, scratch, out: str, base_steps: int) -> dict:
  """Arm `name` of `seed` trained (or reused) after what it starts from, and scored: its row."""
  ensure_base(seed, out, base_steps)
  if ARMS[name].init == "cot_sft":
    run_one("cot_sft", seed, scratch, out, base_steps)
    ensure_export(workdir_of(out, "cot_sft", seed), export_dir(out, "cot_sft", seed))
  workdir = workdir_of(out, name, seed)
  if not os.path.exists(os.path.join(workdir, "final", "run.json")):
    print(f"== {name} seed {seed}: training", flush=True)
  summary = toy_runs.train_run(workdir, arm_config(scratch, name, seed, out))
  codi = name in CODI_ARMS
  row = toy_runs.evaluate_run(
    workdir, scratch.eval.max_new_tokens, probe=name in THOUGHTS, teacher=codi
  )
  valid, per_layer = _logged(workdir)
  row.update(
    seed=seed,
    wall_seconds=summary.get("wall_seconds") or 0.0,
    train_seconds=summary.get("train_seconds", 0.0),
    valid=valid[-1] if valid else {},
    valid_curve=valid,
  )
  if codi:
    probe = _distill_probe(workdir)
    row["distill_train_step"] = per_layer and per_layer["step"]
    row["distill_train_per_layer"] = per_layer and per_layer["terms"]
    row["distill_test_per_layer"] = [e["distill_loss"] for e in probe["entries"]]
    row["teacher_state_answer_probe"] = [e["probe_teacher"] for e in probe["entries"]]
  return row


# ------------------------------------------------------------------------------ parallel runs


def tasks_of(names: list[str], seeds: list[int]) -> dict[tuple[str, int], list[tuple[str, int]]]:
  """Every run to make, base stages included -> the runs it needs first."""
  deps = {("base", s): [] for s in seeds}
  for s in seeds:
    for n in names:
      deps[(n, s)] = [("base", s)]
      if ARMS[n].init == "cot_sft":
        deps[("cot_sft", s)] = [("base", s)]
        deps[(n, s)].append(("cot_sft", s))
  return deps


def _priority(task, deps) -> float:
  """Its cost plus the longest chain of runs waiting on it: the critical path starts first."""
  waiting = [t for t, d in deps.items() if task in d]
  return COST.get(task[0], 4) + max((_priority(t, deps) for t in waiting), default=0)


def run_parallel(deps, done, n: int, command, log_dir: str) -> None:
  """Runs every task of `deps` not `done(task)` as `command(task)`, at most n at a time, each in
  a subprocess pinned to its own core, each started once what it needs has finished. A task that
  fails is reported at the end; the ones needing it are not started."""
  if not hasattr(os, "sched_setaffinity"):
    raise InputError(f"--workers={n}: pinning runs to cores needs Linux (os.sched_setaffinity)")
  cores = sorted(os.sched_getaffinity(0))
  if n > len(cores):
    raise InputError(f"--workers={n}: this process may use only {len(cores)} cores")
  pending = sorted((t for t in deps if not done(t)), key=lambda t: -_priority(t, deps))
  finished = {t for t in deps if t not in pending}
  running, failed = {}, []
  try:
    while pending or running:
      for core, (task, proc, log) in list(running.items()):
        if proc.poll() is not None:
          del running[core]
          if proc.returncode == 0:
            finished.add(task)
          else:
            failed.append(log)
      blocked = [t for t in pending if any(d in deps and d not in finished for d in deps[t])]
      lost = [t for t in blocked if not any(d in pending or d in _tasks(running) for d in deps[t])]
      for t in lost:  # what it needs failed
        pending.remove(t)
      ready = [t for t in pending if t not in blocked]
      for core in [c for c in cores[:n] if c not in running]:
        if not ready:
          break
        task = ready.pop(0)
        pending.remove(task)
        log = os.path.join(log_dir, f"{task[0]}_s{task[1]}.log")
        print(f"== {task[0]} seed {task[1]} on core {core}; log {log}", flush=True)
        with open(log, "a", encoding="utf-8") as f:
          proc = subprocess.Popen(  # pylint: disable=consider-using-with
            command(task),
            stdout=f,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda c=core: os.sched_setaffinity(0, {c}),
          )
        running[core] = (task, proc, log)
      time.sleep(1.0 if running else 0.0)
  except KeyboardInterrupt:  # the runs got the signal too: they checkpoint and stop
    for _, proc, _ in running.values():
      proc.wait()
    raise
  if failed:
    raise InputError(f"--workers: {len(failed)} run(s) failed; see {', '.join(failed)}")


def _tasks(running) -> list:
  return [task for task, _, _ in running.values()]


def is_done(task, out: str) -> bool:
  """Whether `task`'s run is trained, exported where needed and scored (nothing left to start)."""
  name, seed = task
  workdir = workdir_of(out, name, seed)
  if name == "base":
    return _exported(export_dir(out, "base", seed))
  need = [os.path.join(workdir, "toy_eval.json")]
  if name in CODI_ARMS:
    need.append(os.path.join(workdir, "distill_probe.json"))
  return all(os.path.exists(p) for p in need)


# ---------------------------------------------------------------------------------- the table


def _mean(values):
  values = [v for v in values if v is not None]
  return statistics.fmean(values) if values else None


def choose_beta(rows: dict) -> str | None:
  """The CODI arm (beta 1 or 0.3) with the higher mean validation student accuracy."""
  scored = {
    n: _mean([r["valid"].get("valid/student_acc") for r in rows[n]])
    for n in CANDIDATES
    if n in rows
  }
  scored = {n: v for n, v in scored.items() if v is not None}
  return max(scored, key=scored.get) if scored else None


def verdict(rows: dict) -> str:
  """Issue 23's criteria on the test split, with the numbers; a tie is within 1 point."""
  chosen = choose_beta(rows)
  if not chosen or not {"codi_no_distill", "cot_sft"} <= set(rows):
    return "verdict: not yet (needs CODI, CODI w/o distillation and CoT-SFT)"
  by_seed = {n: {r["seed"]: r for r in rows[n]} for n in (chosen, "codi_no_distill", "cot_sft")}
  seeds = sorted(set.intersection(*(set(v) for v in by_seed.values())))
  acc = {n: [by_seed[n][s]["accuracy"] for s in seeds] for n in by_seed}
  diffs = [100 * (a - b) for a, b in zip(acc[chosen], acc["codi_no_distill"])]
  m = {n: 100 * statistics.fmean(v) for n, v in acc.items()}
  teach = {
    n: _mean([by_seed[n][s].get("teacher_accuracy") for s in seeds])
    for n in (chosen, "codi_no_distill")
  }
  reproduces = (
    m[chosen] >= 0.9 * m["cot_sft"] and statistics.fmean(diffs) >= 5 and all(d > 0 for d in diffs)
  )
  ties_or_wins = sum(d <= 1.0 for d in diffs)
  both_trail = m["cot_sft"] - m[chosen] > 10 and m["cot_sft"] - m["codi_no_distill"] > 10
  teacher_falls = (
    None not in teach.values() and 100 * (teach["codi_no_distill"] - teach[chosen]) > 10
  )
  refutes = (ties_or_wins >= 2 and both_trail) or teacher_falls
  word = "reproduces" if reproduces else "refutes" if refutes else "inconclusive"
  t = {n: "-" if v is None else f"{100 * v:.1f}" for n, v in teach.items()}
  return (
    f"verdict ({len(seeds)} paired seeds, {chosen} chosen on validation): **{word}**. "
    f"{chosen} {m[chosen]:.1f}% vs CoT-SFT {m['cot_sft']:.1f}% (ratio "
    f"{m[chosen] / max(m['cot_sft'], 1e-9):.2f}, needs >= 0.9); vs beta 0 "
    f"{m['codi_no_distill']:.1f}%: per seed {' / '.join(f'{d:+.1f}' for d in diffs)} points "
    f"(mean {statistics.fmean(diffs):+.1f}, needs >= +5 and every seed ahead); beta 0 ties "
    f"(within 1 point) or wins in {ties_or_wins}; teacher mode {t[chosen]}% vs beta 0 "
    f"{t['codi_no_distill']}%."
  )


def table(rows: dict) -> str:
  """Markdown: one line per arm, mean ± std over its seeds, per-seed test accuracy."""
  head = (
    "| arm | seeds | test acc % | per seed | valid acc % | teacher mode test / valid % | "
    "distill distance train / test (mean of entries) | tokens/problem | thoughts | compression |"
    " Table 3: step 1 / 2 / 3 % | train min/run |"
  )
  lines = [head, "|" + "---|" * 12]
  for name, c in toy_runs.shared_cells(rows).items():
    runs = rows[name]
    mode = "student" if "valid/student_acc" in runs[0]["valid"] else "teacher"
    teacher, dist = "-", "-"
    if name in CODI_ARMS:
      teacher = (
        f"{toy_runs.mean_std([r.get('teacher_accuracy') for r in runs])} / "
        f"{toy_runs.mean_std([r['valid'].get('valid/teacher_acc') for r in runs])}"
      )
      dist = " / ".join(
        toy_runs.mean_std([_mean(r[k] or []) for r in runs], 1.0, ".3f")
        for k in ("distill_train_per_layer", "distill_test_per_layer")
      )
    per_seed = " / ".join(f"{100 * r['accuracy']:.1f}" for r in runs)
    valid = toy_runs.mean_std([r["valid"].get(f"valid/{mode}_acc") for r in runs])
    lines.append(
      f"| {name} | {len(runs)} | {c['acc']} | {per_seed} | {valid} | {teacher} | {dist} | "
      f"{c['tokens']} | {c['thoughts']} | {c['comp']} | {c['t3']} | {c['minutes']} |"
    )
  return "\n".join(lines)


def write_table(scratch, seeds, rows, bases, out, t_start, final=False):
  """<out>/table.md and results.json (after every run: a partial table is readable)."""
  c = scratch
  base_acc = ", ".join(
    f"s{s} {100 * b.get('valid/teacher_acc', 0):.1f}%" for s, b in sorted(bases.items())
  )
  header = (
    f"Pretrained-LoRA regime, task {dict(c.data.synthetic)}, last CoT step dropped; base "
    f"(configs/toy_base.py, 1-2 operations) valid acc {base_acc or '-'}; model {c.model.arch} "
    f"d={c.model.d_model} L={c.model.num_layers}; LoRA r={LORA['lora_rank']} "
    f"alpha={LORA['lora_alpha']:g}; {c.optim.num_steps} steps x batch {c.data.batch_size}; "
    f"{c.codi.num_latent} CODI thoughts; seeds {seeds}; "
    f"{(time.time() - t_start) / 60:.0f} min this invocation."
  )
  chosen = choose_beta(rows)
  text = table(rows) + "\n\n" + f"beta chosen on validation: {chosen or '-'}\n\n" + verdict(rows)
  write_atomic(os.path.join(out, "table.md"), header + "\n\n" + text + "\n")
  bases_json = {str(s): b for s, b in bases.items()}
  write_json(
    os.path.join(out, "results.json"),
    {"config": c.to_dict(), "lora": LORA, "bases": bases_json, "chosen": chosen, "rows": rows},
  )
  if final:
    print(header)
    print(text)
