r"""The CODI paper's main comparison at toy scale: No-CoT-SFT, CoT-SFT, CODI and CODI without distillation.

  python experiments/toy_table.py --out=/tmp/codi_toy
  python experiments/toy_table.py --out=/tmp/codi_toy --config=configs/demo.py --config.optim.num_steps=2000

Every method trains from scratch with the same config, steps, batch and seed (equal compute up to the
per-step cost of each method, which the table reports), then is evaluated on the synthetic test split
(never seen in training or validation): accuracy, tokens generated per problem (CODI's continuous
thoughts counted as tokens), compression against CoT-SFT, and latency per problem at batch 1 and
batched. A finished method is not retrained when the script is run again (its workdir/final is
reused, and an interrupted one resumes from its last checkpoint), so an interrupted sweep resumes
where it stopped. Writes <out>/table.md and results.json.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codi_jax import runtime
from codi_jax.errors import exit_on_input_error

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/demo.py", "Base config for every method."
)
_OUT = flags.DEFINE_string("out", "/tmp/codi_toy", "Directory for the runs and the table.")
_METHODS = flags.DEFINE_list(
  "methods", "no_cot_sft,cot_sft,codi,codi_no_distill", "Methods to run."
)

# name -> (config.codi.method, overrides of config.codi)
METHODS = {
  "no_cot_sft": ("no_cot_sft", {}),
  "cot_sft": ("cot_sft", {}),
  "codi": ("codi", {}),
  "codi_no_distill": ("codi", {"beta": 0.0}),  # the paper's "w/o L_KD" ablation
}


def train_one(name: str, base, out: str) -> tuple[str, dict]:
  """Trains `name` unless its workdir already holds a finished run; returns (workdir, run summary)."""
  from codi_jax import train_lib  # pylint: disable=import-outside-toplevel

  workdir = os.path.join(out, name)
  run_json = os.path.join(workdir, "final", "run.json")
  if os.path.exists(run_json):
    print(f"== {name}: finished run found in {workdir}, not retrained", flush=True)
    with open(run_json, encoding="utf-8") as f:
      return workdir, json.load(f)
  method, overrides = METHODS[name]
  config = base.copy_and_resolve_references()
  config.codi.method = method
  for k, v in overrides.items():
    config.codi[k] = v
  config.workdir = workdir  # an interrupted run resumes from its newest checkpoint
  print(f"== {name}: training ({method}, {overrides or 'defaults'})", flush=True)
  return workdir, train_lib.train_and_evaluate(config, workdir)


def evaluate_one(workdir: str) -> dict:
  """Test-split accuracy, tokens and latency of one finished run."""
  from codi_jax import eval_lib  # pylint: disable=import-outside-toplevel

  res = eval_lib.evaluate(
    eval_lib.Options(workdir=workdir, split="test", efficiency=True, progress=False)
  )
  s, eff = (
    res["results"][0],
    res["efficiency"]["codi"],
  )  # "codi" holds the evaluated run's own stats
  return {
    "accuracy": s["accuracy"],
    "n": s["n"],
    "thoughts": s["thoughts"],
    "generated_tokens": s["mean_generated_tokens"],
    "tokens_per_problem": s["thoughts"] + s["mean_generated_tokens"],
    "ms_batch1": 1e3 * eff["latency"]["batch1"]["per_problem_s"],
    "ms_batched": 1e3 * eff["latency"]["batched"]["per_problem_s"],
    "batch": eff["latency"]["batched"]["batch_size"],
  }


def table(rows: dict) -> str:
  cot = rows.get("cot_sft", {}).get("tokens_per_problem")
  head = (
    "| method | test acc | tokens/problem | compression vs CoT | ms/problem b=1 | "
    "ms/problem batched | train s | s/step |"
  )
  lines = [head, "|" + "---|" * 8]
  for name, r in rows.items():
    comp = f"{cot / r['tokens_per_problem']:.2f}x" if cot and r["tokens_per_problem"] else "-"
    lines.append(
      f"| {name} | {100 * r['accuracy']:.1f}% | {r['tokens_per_problem']:.1f} | {comp} | "
      f"{r['ms_batch1']:.1f} | {r['ms_batched']:.2f} | {r['train_seconds']:.0f} | "
      f"{r['train_seconds'] / max(r['steps'], 1):.2f} |"
    )
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime.setup_cli()
  out = os.path.abspath(_OUT.value)
  with exit_on_input_error("experiments/toy_table.py"):
    unknown = [m for m in _METHODS.value if m not in METHODS]
    if unknown:
      from codi_jax.errors import InputError  # pylint: disable=import-outside-toplevel

      raise InputError(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
    os.makedirs(out, exist_ok=True)
    rows = {}
    for name in _METHODS.value:
      workdir, summary = train_one(name, _CONFIG.value, out)
      rows[name] = {
        **evaluate_one(workdir),
        "steps": summary.get("steps", 0),
        "train_seconds": summary.get("train_seconds", 0.0),
        "valid": {k: v for k, v in summary.items() if k.startswith("valid/")},
      }
      print(f"== {name}: {json.dumps(rows[name])}", flush=True)
  text = table(rows)
  cfg = _CONFIG.value
  header = (
    f"Synthetic task {dict(cfg.data.synthetic)}; model {cfg.model.arch} d={cfg.model.d_model} "
    f"L={cfg.model.num_layers}; {cfg.optim.num_steps} steps x batch {cfg.data.batch_size}; "
    f"{cfg.codi.num_latent} thoughts; seed {cfg.seed}."
  )
  with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
    f.write(header + "\n\n" + text + "\n")
  with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"config": cfg.to_dict(), "rows": rows}, f, indent=2, default=str)
  print(header)
  print(text)


if __name__ == "__main__":
  app.run(main)
