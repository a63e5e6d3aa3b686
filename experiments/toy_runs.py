"""One run of the toy tables: train (or resume, or reuse) it, score it on the test split, summarise.

Shared by both regimes of experiments/toy_table.py (from scratch, and experiments/pretrained_lora.py).
Every result is cached in the run's folder, so a rerun of the table only reads finished runs.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from codi_jax.errors import InputError
from codi_jax.files import write_json


def train_run(workdir: str, config) -> dict:
  """Trains (or resumes) the run of `config` in `workdir`, or reuses it when finished; its summary
  (`wall_seconds` added: this session's time when trained here, else the recorded one)."""
  from codi_jax import train_lib  # pylint: disable=import-outside-toplevel

  run_json = os.path.join(workdir, "final", "run.json")
  wall_json = os.path.join(workdir, "wall.json")
  if os.path.exists(run_json):
    with open(run_json, encoding="utf-8") as f:
      summary = json.load(f)
    if os.path.exists(wall_json):
      with open(wall_json, encoding="utf-8") as f:
        summary["wall_seconds"] = json.load(f)["wall_seconds"]
    return summary
  t0 = time.time()
  summary = train_lib.train_and_evaluate(config, workdir)
  if summary.get("preempted"):
    raise InputError(f"{workdir}: preempted at step {summary['stopped_at']}; rerun to resume")
  summary["wall_seconds"] = round(time.time() - t0, 1)
  write_json(wall_json, {"wall_seconds": summary["wall_seconds"]})
  return summary


def evaluate_run(workdir: str, max_new_tokens: int, *, probe: bool, teacher: bool = False) -> dict:
  """Test accuracy, generated tokens, thoughts and (`probe`) Table 3 of a finished run; with
  `teacher` also its teacher mode (explicit CoT, the same weights). Cached in toy_eval.json."""
  from codi_jax import eval_lib  # pylint: disable=import-outside-toplevel

  cached = os.path.join(workdir, "toy_eval.json")
  if os.path.exists(cached):
    with open(cached, encoding="utf-8") as f:
      return json.load(f)
  opts = eval_lib.Options(
    workdir=workdir,
    probe=probe,
    progress=False,
    max_new_tokens=max_new_tokens,
    mode="both" if teacher else "auto",
  )
  res = eval_lib.evaluate(opts)
  s = res["results"][0]  # the run's own mode (student first under "both")
  row = {
    "accuracy": s["accuracy"],
    "n": s["n"],
    "thoughts": s["thoughts"],
    "generated_tokens": s["mean_generated_tokens"],
    "eval_seconds": s["eval_seconds"],
  }
  if probe:
    row["table3"] = [st.get("rate") for st in s["probe"]["table3"]["steps"]]
  if teacher:
    t = next(r for r in res["results"] if r["mode"] == "teacher")
    row["teacher_accuracy"] = t["accuracy"]
  write_json(cached, row)
  return row


def shared_cells(rows: dict) -> dict[str, dict[str, str]]:
  """The columns both tables give, per method: test accuracy, tokens per problem (thoughts
  counted), thoughts, compression (CoT-SFT minus No-CoT-SFT tokens per thought), Table 3's
  per-step rates and minutes per run."""
  mean = {n: statistics.fmean(r["generated_tokens"] for r in runs) for n, runs in rows.items()}
  cot = mean["cot_sft"] - mean["no_cot_sft"] if {"cot_sft", "no_cot_sft"} <= set(rows) else None
  cells = {}
  for name, runs in rows.items():
    thoughts = runs[0]["thoughts"]
    t3 = "-"
    if "table3" in runs[0]:
      # Table 3 counts correctly answered problems only (as the reference): none, no rate.
      t3 = " / ".join(
        mean_std([r["table3"][k] if len(r["table3"]) > k else None for r in runs]) for k in range(3)
      )
    tokens = statistics.fmean(r["generated_tokens"] + r["thoughts"] for r in runs)
    cells[name] = {
      "acc": mean_std([r["accuracy"] for r in runs]),
      "tokens": f"{tokens:.1f}",
      "thoughts": str(thoughts),
      "comp": f"{cot / thoughts:.1f}x" if cot and thoughts else "-",
      "t3": t3,
      "minutes": f"{statistics.fmean(r['wall_seconds'] for r in runs) / 60:.1f}",
    }
  return cells


def mean_std(values, scale: float = 100.0, fmt: str = ".1f") -> str:
  """'mean ± std' of the values that are not None, times `scale` ('-' if none)."""
  values = [scale * v for v in values if v is not None]
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:{fmt}}"
  return f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"
