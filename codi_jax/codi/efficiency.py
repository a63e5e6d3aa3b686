"""Efficiency of continuous thoughts against explicit CoT: tokens per problem, compression, latency.

Latency is wall time per problem of the jitted decode (question encoding included), timed with
`block_until_ready`: the first call of each shape (compile + one run) is reported on its own, then
the median over the remaining calls. Compression follows the paper (docs/codi.md 7.4): the CoT-SFT
model's mean generated tokens / (N + 2), the thoughts plus [bot] and [eot]; we also give the ratio
of generated tokens per problem, thoughts and answer included.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import jax


def time_calls(call: Callable, inputs: Sequence[tuple], per_call: int) -> dict:
  """Times `call(*inputs[i])`: the first call (compile included) alone, then the median of the rest.

  `per_call` problems are solved per call. Returns {first_call_s, compile_s (first minus median),
  median_call_s, per_problem_s, calls}.
  """
  if len(inputs) < 2:
    raise ValueError("time_calls needs a warm-up input and at least one timed input")
  times = []
  for args in inputs:
    t = time.perf_counter()
    jax.block_until_ready(call(*args))
    times.append(time.perf_counter() - t)
  median = statistics.median(times[1:])
  return {
    "first_call_s": times[0],
    "compile_s": max(0.0, times[0] - median),
    "median_call_s": median,
    "per_problem_s": median / per_call,
    "calls": len(times) - 1,
    "batch_size": per_call,
  }


def report(codi: Mapping, cot: Mapping | None) -> dict:
  """The efficiency comparison from two `method_stats`-shaped dicts (cot may be None).

  Each holds thoughts, mean_generated_tokens and latency {batch1, batched} from `time_calls`.
  """
  out = {"codi": dict(codi), "cot_sft": None if cot is None else dict(cot)}
  codi_total = codi["thoughts"] + codi["mean_generated_tokens"]
  out["codi"]["tokens_per_problem"] = codi_total
  if cot is None:
    return out
  cot_total = cot["mean_generated_tokens"]
  out["cot_sft"]["tokens_per_problem"] = cot_total
  out["compression_paper"] = cot_total / (codi["thoughts"] + 2)
  out["compression_tokens"] = cot_total / codi_total if codi_total else None
  out["speedup"] = {
    name: cot["latency"][name]["per_problem_s"] / codi["latency"][name]["per_problem_s"]
    for name in ("batch1", "batched")
  }
  return out


def format_report(rep: Mapping) -> str:
  """The efficiency report as a text table (one row per model, then the ratios)."""
  head = (
    f"{'model':<8} | {'acc':>6} | {'thoughts':>8} | {'gen tok':>7} | {'tok/problem':>11} | "
    f"{'ms/problem b=1':>14} | {'ms/problem b=B':>14} | {'compile s':>9}"
  )
  lines = [head, "-" * len(head)]
  for name in ("codi", "cot_sft"):
    m = rep.get(name)
    if not m:
      continue
    lat = m["latency"]
    compile_s = lat["batch1"]["compile_s"] + lat["batched"]["compile_s"]
    lines.append(
      f"{name:<8} | {100 * m['accuracy']:>5.1f}% | {m['thoughts']:>8} | "
      f"{m['mean_generated_tokens']:>7.2f} | "
      f"{m['tokens_per_problem']:>11.2f} | {1e3 * lat['batch1']['per_problem_s']:>14.2f} | "
      f"{1e3 * lat['batched']['per_problem_s']:>14.2f} | {compile_s:>9.2f}"
    )
  if rep.get("cot_sft"):
    sp = rep["speedup"]
    lines.append(
      f"compression: {rep['compression_paper']:.2f}x (paper: CoT tokens / (N+2)), "
      f"{rep['compression_tokens']:.2f}x (generated tokens per problem); "
      f"speed-up: {sp['batch1']:.2f}x at batch 1, {sp['batched']:.2f}x batched"
    )
  return "\n".join(lines)
