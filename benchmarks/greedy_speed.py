"""Greedy decoding speed: our jitted Generator vs HF transformers `generate` (SmolLM2-135M, f32, CPU).

Also measures the machine's memory bandwidth and the batch-1 bandwidth floor it implies.
Run: python benchmarks/greedy_speed.py [--new-tokens 64] [--batch-sizes 1 8] [--json out.json]
Prints numbers only; it never asserts.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

PROMPT_TEXT = (
  "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
  "combined movable metal type, oil-based ink and a screw press into a practical system. Within a "
  "few decades, printers across Europe were producing books, pamphlets and broadsheets in numbers "
  "that scribes could never match, and the cost of a book fell sharply. Scholars argue about how "
  "quickly literacy rose, but nobody doubts that the press changed how ideas travelled. "
  "Summarise the main consequences of this invention in a few sentences."
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2", help="codi_jax model spec (must be a .gguf for HF)")
  p.add_argument("--prompt-tokens", type=int, default=74, help="prompt length in tokens")
  p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
  p.add_argument("--runs", type=int, default=3, help="timed runs per setting (median reported)")
  p.add_argument("--torch-threads", type=int, default=2)
  p.add_argument("--bw-mb", type=int, default=512, help="array size in MB for the bandwidth probes")
  p.add_argument("--bw-reps", type=int, default=5, help="bandwidth repetitions (best kept)")
  p.add_argument("--no-decode-only", action="store_true", help="skip the max_new=1 runs")
  p.add_argument("--json", default=None, help="write the numbers to this path")
  return p.parse_args(argv)


def timed(fn, runs: int, counter=None) -> tuple[float, object, int]:
  """Median wall time of `runs` calls after one warm-up call: (seconds, last output, counter change)."""
  out = fn()
  c0 = counter() if counter else 0
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out, (counter() - c0 if counter else 0)


def numpy_copy_bw(mb: int, reps: int) -> float:
  """Bytes/s of np.copyto on a large f32 array, read + write counted."""
  n = mb * 2**20 // 4
  src = np.ones(n, np.float32)
  dst = np.empty_like(src)
  np.copyto(dst, src)
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t0)
  return 2 * src.nbytes / best


def jax_sum_bw(mb: int, reps: int) -> float:
  """Bytes/s of a jitted sum over a large f32 array, read bytes only."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  n = mb * 2**20 // 4
  x = jnp.ones((n,), jnp.float32).block_until_ready()
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return x.nbytes / best


def log(msg: str):
  """Progress line on stderr (the table goes to stdout)."""
  print(f"[greedy_speed] {msg}", file=sys.stderr, flush=True)


def first_diff(a, b) -> int | None:
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None):
  args = parse_args(argv)
  t_start = time.perf_counter()

  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from codi_jax.decoding import Generator  # pylint: disable=import-outside-toplevel
  from codi_jax.models import loader  # pylint: disable=import-outside-toplevel

  load0 = os.getloadavg()[0]
  # Bandwidth first, while nothing else is resident.
  bw_np = numpy_copy_bw(args.bw_mb, args.bw_reps)
  bw_jax = jax_sum_bw(args.bw_mb, args.bw_reps)
  log(f"bandwidth: numpy copy {bw_np / 1e9:.1f} GB/s, jax sum {bw_jax / 1e9:.1f} GB/s")

  loaded = loader.load(args.model)
  leaves = jax.tree.leaves(nnx.state(loaded.model))
  weight_bytes = sum(int(x.size) * 4 for x in leaves)  # f32 bytes; tied embedding is one leaf
  n_params = sum(int(x.size) for x in leaves)
  floor_np = bw_np / weight_bytes
  floor_jax = bw_jax / weight_bytes

  ids = loaded.tokenizer.encode(PROMPT_TEXT)
  while len(ids) < args.prompt_tokens:
    ids = ids + loaded.tokenizer.encode(" " + PROMPT_TEXT)
  ids = ids[: args.prompt_tokens]
  N = args.new_tokens
  pad_id = 2
  gen = Generator(loaded.model, pad_id=pad_id, eos_ids=[-1])  # -1: never stops early

  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(args.torch_threads)
  transformers.logging.set_verbosity_error()
  path = loaded.source
  hf = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  )
  hf.eval()
  log(f"models loaded ({time.perf_counter() - t_start:.0f} s)")

  def hf_gen(x, m, n):
    with torch.inference_mode():
      return hf.generate(
        x,
        attention_mask=m,
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=pad_id,
      )

  rows, match, notes = [], None, []
  for B in args.batch_sizes:
    prompts = [list(ids)] * B
    x = torch.tensor(prompts, dtype=torch.long)
    m = torch.ones_like(x)

    def compiles():
      return gen.compiles

    t_ours, out_ours, rc = timed(functools.partial(gen, prompts, N), args.runs, compiles)
    log(f"batch {B}: ours {t_ours:.3f} s ({B * N / t_ours:.1f} tok/s)")
    t_hf, out_hf, _ = timed(functools.partial(hf_gen, x, m, N), args.runs)
    log(f"batch {B}: HF {t_hf:.3f} s ({B * N / t_hf:.1f} tok/s)")
    out_hf = out_hf[:, x.shape[1] :].tolist()
    row = {
      "batch": B,
      "ours_s": t_ours,
      "hf_s": t_hf,
      "ours_tps": B * N / t_ours,
      "hf_tps": B * N / t_hf,
      "ours_len": len(out_ours[0]),
      "hf_len": len(out_hf[0]),
    }
    if not args.no_decode_only and N > 1:
      t1_ours, _, rc1 = timed(functools.partial(gen, prompts, 1), args.runs, compiles)
      t1_hf, _, _ = timed(functools.partial(hf_gen, x, m, 1), args.runs)
      rc += rc1
      row.update(
        ours_prefill_s=t1_ours,
        hf_prefill_s=t1_hf,
        ours_decode_tps=B * (N - 1) / max(t_ours - t1_ours, 1e-9),
        hf_decode_tps=B * (N - 1) / max(t_hf - t1_hf, 1e-9),
      )
    row["ours_recompiles_timed"] = rc
    row["ratio"] = row["ours_tps"] / row["hf_tps"]
    if row["ours_len"] != N or row["hf_len"] != N:
      notes.append(
        f"batch {B}: generated lengths ours={row['ours_len']} hf={row['hf_len']} (wanted {N})"
      )
    if B == 1:
      d = first_diff(out_ours[0], out_hf[0])
      match = {"match": d is None, "first_diff": d, "ours": out_ours[0], "hf": out_hf[0]}
    rows.append(row)

  # ---- report ----
  print(
    f"\nmachine: {platform.machine()} {os.cpu_count()} cpus | jax {jax.__version__} {jax.devices()[0].platform} | "
    f"torch {torch.__version__} ({args.torch_threads} threads) | transformers {transformers.__version__}"
  )
  load1 = os.getloadavg()[0]
  print(
    f"load average (1 min) at start {load0:.1f}, at end {load1:.1f} on {os.cpu_count()} cpus"
    + (
      "  ** machine busy: timings unreliable **"
      if max(load0, load1) > 1.5 * (os.cpu_count() or 1)
      else ""
    )
  )
  print(
    f"model: {path}  params {n_params / 1e6:.1f}M  f32 weight bytes {weight_bytes / 1e6:.1f} MB"
  )
  print(
    f"protocol: prompt {len(ids)} tokens, {N} new tokens, greedy, warm-up + median of {args.runs}; "
    f"tokens/s = batch*new/time(whole call incl. prefill)\n"
  )
  has_dec = any("ours_decode_tps" in r for r in rows)
  hdr = f"{'batch':>5} | {'ours s':>7} | {'HF s':>7} | {'ours tok/s':>10} | {'HF tok/s':>9} | {'ours/HF':>7}"
  if has_dec:
    hdr += f" | {'ours dec tok/s':>14} | {'HF dec tok/s':>12} | {'dec ratio':>9}"
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    line = (
      f"{r['batch']:>5} | {r['ours_s']:>7.3f} | {r['hf_s']:>7.3f} | {r['ours_tps']:>10.1f} | "
      f"{r['hf_tps']:>9.1f} | {r['ratio']:>6.2f}x"
    )
    if "ours_decode_tps" in r:
      line += (
        f" | {r['ours_decode_tps']:>14.1f} | {r['hf_decode_tps']:>12.1f} | "
        f"{r['ours_decode_tps'] / r['hf_decode_tps']:>8.2f}x"
      )
    print(line)
  if has_dec:
    print("(dec = decode only: batch*(new-1) / (t(new) - t(1)); t(1) = prefill + first token)")
  print("(an earlier idle-machine run measured HF at 28.1 tok/s batch 1 and 103.9 tok/s batch 8)")
  print(
    f"our recompiles during timed runs: {sum(r['ours_recompiles_timed'] for r in rows)} (expected 0)"
  )

  print(
    f"\nbandwidth: numpy copy (read+write) {bw_np / 1e9:.1f} GB/s | jax jit sum (read) {bw_jax / 1e9:.1f} GB/s "
    f"({args.bw_mb} MB f32, best of {args.bw_reps})"
  )
  print(
    f"batch-1 floor = bandwidth / {weight_bytes / 1e6:.1f} MB per token: "
    f"{floor_np:.1f} tok/s (numpy copy) | {floor_jax:.1f} tok/s (jax sum)"
  )
  b1 = next((r for r in rows if r["batch"] == 1), None)
  b8 = next((r for r in rows if r["batch"] == 8), None)
  if b1:
    print(
      f"ours batch 1: {b1['ours_tps']:.1f} tok/s = {100 * b1['ours_tps'] / floor_np:.0f}% of numpy-copy floor, "
      f"{100 * b1['ours_tps'] / floor_jax:.0f}% of jax-sum floor"
    )
    if "ours_decode_tps" in b1:
      print(
        f"ours batch 1 decode only: {b1['ours_decode_tps']:.1f} tok/s = "
        f"{100 * b1['ours_decode_tps'] / floor_np:.0f}% / {100 * b1['ours_decode_tps'] / floor_jax:.0f}%"
      )
  if match:
    extra = "" if match["match"] else f" (first difference at new token {match['first_diff']})"
    print(f"\ntokens match (batch 1, {N} new): {'yes' if match['match'] else 'no'}{extra}")
  for n in notes:
    print(f"note: {n}")

  print("\ntargets:")
  if b1:
    for name, fl in (("numpy copy", floor_np), ("jax sum", floor_jax)):
      ok = b1["ours_tps"] >= 0.9 * fl
      print(
        f"  batch 1 >= 90% of floor ({name} bandwidth, {0.9 * fl:.1f} tok/s): "
        f"{'MET' if ok else 'NOT MET'} ({100 * b1['ours_tps'] / fl:.0f}%)"
      )
  if b8:
    ok = b8["ratio"] >= 3.0
    print(f"  batch 8 >= 3x HF: {'MET' if ok else 'NOT MET'} ({b8['ratio']:.2f}x)")
  total = time.perf_counter() - t_start
  print(f"\ntotal runtime {total:.0f} s")

  if args.json:
    res = {
      "args": vars(args),
      "loadavg_start": load0,
      "loadavg_end": load1,
      "prompt_tokens": len(ids),
      "n_params": n_params,
      "weight_bytes": weight_bytes,
      "bw_numpy_copy_Bps": bw_np,
      "bw_jax_sum_Bps": bw_jax,
      "floor_numpy_tps": floor_np,
      "floor_jax_tps": floor_jax,
      "rows": rows,
      "tokens_match": match,
      "notes": notes,
      "runtime_s": total,
    }
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
