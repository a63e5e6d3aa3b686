"""Decode cost vs KV-cache capacity: the fixed-capacity path ("before") vs length-aware decoding.

The same prompt and the same N generated tokens under several max_new_tokens budgets: the decode
runs `Generator`'s own programs (prefill + greedy segments) on the cache schedule a `budget`-token
call gets (`cache.capacities`: before, one cache of prompt + budget slots; after, buckets from
--min-capacity), with the loop told to stop after N tokens and stop ids that never occur, so every
setting decodes exactly N tokens. Every program is compiled ahead of time (its memory_analysis
read there) and the compiled executables are timed, so nothing compiles inside a timed call. Per
budget and batch size: per-token decode time ((call - prefill) / (tokens - 1), best calls), the
capacity the cache reached and the programs run (one per bucket), peak memory (device memory
stats where the backend has them; else the compiled programs' memory_analysis: arguments +
outputs + temporaries - aliased, weights excluded, the largest program of the run), the estimate
of `codi_jax.models.memory` at the capacity reached, and whether both paths emitted the same
tokens. A fixed-path setting whose call would exceed --max-call-s (extrapolated from the previous
budget) decodes fewer tokens: its per-token cost does not depend on the fill.

Run: python benchmarks/decode_scaling.py [--budgets 512 4096 32768] [--batch-sizes 1 8]
Prints a table only; it never asserts. A fixed-path setting whose estimate exceeds --max-mem-frac of
the available memory is compiled (for its memory analysis) but not run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

PROMPT_TEXT = (
  "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
  "combined movable metal type, oil-based ink and a screw press into a practical system. Within a "
  "few decades, printers across Europe were producing books, pamphlets and broadsheets in numbers "
  "that scribes could never match, and the cost of a book fell sharply. Scholars argue about how "
  "quickly literacy rose, but nobody doubts that the press changed how ideas travelled. "
  "Summarise the main consequences of this invention in a few sentences."
)
MiB = 1 << 20


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2", help="codi_jax model spec")
  p.add_argument("--prompt-tokens", type=int, default=74, help="prompt length in tokens")
  p.add_argument("--length-bucket", type=int, default=32, help="prompt padding multiple")
  p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
  p.add_argument("--budgets", type=int, nargs="+", default=[512, 4096, 32768])
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
  p.add_argument("--min-capacity", type=int, default=256, help="length-aware first bucket")
  p.add_argument("--runs", type=int, default=3, help="timed calls (best; 1 if a call takes >20 s)")
  p.add_argument("--max-call-s", type=float, default=30.0, help="fixed path: fewer tokens beyond")
  p.add_argument("--max-mem-frac", type=float, default=0.75, help="of available memory")
  return p.parse_args(argv)


def log(msg: str):
  print(f"[decode_scaling] {msg}", file=sys.stderr, flush=True)


def timed(fn, runs: int) -> tuple[float, object]:
  """Seconds of a call of precompiled programs: the best of `runs` calls after an untimed one
  (first executions pay allocation and thread start-up; the best is the least disturbed by the
  other users of a shared machine), or the first call alone if it takes over 20 s."""
  import jax  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  if first > 20:
    return first, out
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times), out


def program_bytes(compiled, weight_bytes: int) -> int:
  """A compiled program's arguments + outputs + temporaries - aliased bytes, weights excluded."""
  ma = compiled.memory_analysis()
  if ma is None:
    return -1
  total = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
  return total - ma.alias_size_in_bytes - weight_bytes


def main(argv=None):
  args = parse_args(argv)
  t_start = time.perf_counter()
  load_start = os.getloadavg()

  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from codi_jax.batching import bucket_size, left_pad  # pylint: disable=import-outside-toplevel
  from codi_jax.decoding import Generator, prefill  # pylint: disable=import-outside-toplevel
  from codi_jax.models import cache as kvc  # pylint: disable=import-outside-toplevel
  from codi_jax.models import loader, memory  # pylint: disable=import-outside-toplevel

  loaded = loader.load(args.model)
  cfg = loaded.config
  weight_bytes = memory.param_bytes(nnx.state(loaded.model))
  ids = loaded.tokenizer.encode(PROMPT_TEXT)
  while len(ids) < args.prompt_tokens:
    ids = ids + loaded.tokenizer.encode(" " + PROMPT_TEXT)
  ids = ids[: args.prompt_tokens]
  P = bucket_size(len(ids), args.length_bucket)
  gen = Generator(loaded.model, pad_id=2, eos_ids=[-1])  # -1: never stops, n tokens per row
  weights = gen.model.state
  pre = gen.model.jit(
    lambda m, x, mask, *, capacity: prefill(m, x, mask, capacity)[0],
    static_argnames=("capacity",),
    name="prefill_only",
  )
  # The Generator's own segmented programs (start: prefill + first segment; resume: grow + next).
  start, resume = gen._run._start, gen._run._resume  # pylint: disable=protected-access
  device = jax.devices()[0]
  log(f"model loaded ({time.perf_counter() - t_start:.0f} s); prompt bucket {P}")

  def peak_stats():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    return None if not stats else stats.get("peak_bytes_in_use")

  cache = {}

  def compiled(key, fn, *args, **static):
    """fn.lower(*args, **static).compile(), once per key."""
    if key not in cache:
      cache[key] = fn.lower(*args, **static).compile()
    return cache[key]

  def programs(B, x, mask, caps, n):
    """Compiled programs of a run that decodes n tokens: start, then resumes up to the first
    bucket holding the prompt and n - 1 steps."""
    k = next(i for i, c in enumerate(caps) if c >= P + n - 1 or i == len(caps) - 1)
    first = {"capacity": caps[0], "last": len(caps) == 1, "max_new": n}
    progs = [compiled(("start", B, n, caps[0], first["last"]), start, x, mask, gen.eos, **first)]
    shapes = jax.eval_shape(lambda a, b: start(a, b, gen.eos, **first), x, mask)
    for i in range(1, k + 1):
      nxt = {"capacity": caps[i], "last": i == len(caps) - 1, "max_new": n}
      key = ("resume", B, n, caps[i - 1], caps[i], nxt["last"])
      seg, st = shapes[0], shapes[1][0]
      progs.append(compiled(key, resume, seg, st, gen.eos, **nxt))
      shapes = jax.eval_shape(lambda s, t, kw=nxt: resume(s, t, gen.eos, **kw), seg, st)
    return progs, caps[: k + 1]

  def drive(progs, x, mask):
    """Segmented's host loop over precompiled programs: (loop state, buckets run)."""
    seg, (st, more) = progs[0](weights, x, mask, gen.eos)
    ran = 1
    for prog in progs[1:]:
      if seg is None or not bool(more):
        break
      seg, (st, more) = prog(weights, seg, st, gen.eos)
      ran += 1
    return st, ran

  rows, notes, tokens = [], [], {}
  N = args.new_tokens
  for path in ("after", "before"):  # device peak is a high-water mark: smallest runs first
    low = args.min_capacity if path == "after" else None
    for B in args.batch_sizes:
      x, mask = (gen.model.put_batch(a) for a in left_pad([ids] * B, gen.pad_id, P))
      prev = None
      for budget in args.budgets:
        caps = kvc.capacities(P, P + budget, low)
        n = N
        if path == "before" and prev is not None:  # per-token cost scales with the capacity
          per_token = prev["decode_ms"] / 1e3 * caps[0] / prev["capacity"]
          if per_token * (N - 1) > args.max_call_s:
            n = max(8, int(args.max_call_s / per_token) + 1)
        row = {"batch": B, "budget": budget, "path": path, "tokens": n}
        t0 = time.perf_counter()
        progs, reach = programs(B, x, mask, caps, n)
        row["compile_s"] = time.perf_counter() - t0
        row["programs"] = len(progs)
        row["program_bytes"] = max(program_bytes(p, weight_bytes) for p in progs)
        est_full = memory.decode_bytes(cfg, B, caps[-1], prompt_len=P)
        avail = memory.available_bytes()
        if path == "before" and est_full > args.max_mem_frac * avail:
          notes.append(
            f"batch {B}, budget {budget}, before: compiled, not run (estimate "
            f"{memory.gib(est_full)}; {memory.gib(avail)} available on this shared machine)"
          )
          rows.append(row)
          continue
        t_call, (st, ran) = timed(lambda p=progs, x=x, mask=mask: drive(p, x, mask), args.runs)
        row["capacity"] = reach[ran - 1]
        pre_prog = compiled(("prefill", B, caps[0]), pre, x, mask, capacity=caps[0])
        t_pre, _ = timed(lambda pp=pre_prog, x=x, mask=mask: pp(weights, x, mask), args.runs)
        row.update(call_s=t_call, prefill_s=t_pre, decode_ms=1e3 * (t_call - t_pre) / (n - 1))
        row["estimate"] = memory.decode_bytes(cfg, B, row["capacity"], prompt_len=P)
        row["device_peak"] = peak_stats()
        if not bool((jax.device_get(st[2]) == n).all()):
          notes.append(f"batch {B}, budget {budget}, {path}: fewer than {n} tokens")
        tokens[path, B, budget] = jax.device_get(st[0]).tolist()
        rows.append(row)
        prev = row
        log(
          f"{path} batch {B} budget {budget}: capacity {row['capacity']}, {n} tokens, "
          f"{row['decode_ms']:.1f} ms/token, prefill {t_pre:.3f} s, "
          f"compile {row['compile_s']:.0f} s"
        )

  load_end = os.getloadavg()
  # ---- report ----
  print(
    f"\n# decode_scaling: {args.model}, {cfg.dtype}, prompt {len(ids)} tokens (bucket {P}), "
    f"{N} new tokens, min_capacity {args.min_capacity}; jax {jax.__version__}, "
    f"{device.platform} ({platform.machine()}, {os.cpu_count()} cpus); "
    f"{datetime.date.today().isoformat()}"
  )
  print(
    f"# load average (1/5/15 min) at start {load_start[0]:.2f} / {load_start[1]:.2f} / "
    f"{load_start[2]:.2f}, at end {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f}; "
    f"wall {time.perf_counter() - t_start:.0f} s"
  )
  peak_name = "device peak MiB" if any(r.get("device_peak") for r in rows) else "program MiB"
  print(
    "\n| batch | budget (capacity) | path | cache reached | programs | tokens | prefill ms |"
    f" decode ms/token | vs after @ {args.budgets[0]} | {peak_name} | estimate MiB | same tokens |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    B, budget = r["batch"], r["budget"]
    base = next(
      (q for q in rows if (q["batch"], q["budget"], q["path"]) == (B, args.budgets[0], "after")),
      None,
    )
    peak = r.get("device_peak") or r["program_bytes"]
    head = f"| {B} | {budget} ({P + budget}) | {r['path']} |"
    if "decode_ms" not in r:
      est = memory.decode_bytes(cfg, B, P + budget, prompt_len=P)
      print(f"{head} not run | {r['programs']} | | | | | {peak / MiB:,.0f} | {est / MiB:,.0f} | |")
      continue
    same = ""
    if ("after", B, budget) in tokens and ("before", B, budget) in tokens:
      a, b = tokens["after", B, budget], tokens["before", B, budget]
      m = min(len(a[0]), len(b[0]), r["tokens"])
      same = "yes" if [t[:m] for t in a] == [t[:m] for t in b] else "NO"
    ratio = r["decode_ms"] / base["decode_ms"] if base and "decode_ms" in base else float("nan")
    print(
      f"{head} {r['capacity']} | {r['programs']} | {r['tokens']} | {1e3 * r['prefill_s']:.0f} | "
      f"{r['decode_ms']:.1f} | {ratio:.2f}x | {peak / MiB:,.0f} | {r['estimate'] / MiB:,.0f} | "
      f"{same} |"
    )
  for note in notes:
    print(f"- {note}")


if __name__ == "__main__":
  main()
