"""`codi_jax.compile`'s numbers for one compiled program, its table and its refusal line.

Per chip: XLA's memory analysis of the program against the chip's HBM, and a cost model of the
step, not a measurement: the roofline of XLA's cost analysis (its FLOPs at the chip's bf16 peak or
its bytes accessed at the HBM bandwidth, whichever is slower), every loop body counted its trip
count times (`codi_jax.hlo.loop_costs`; XLA's own analysis counts it once), with the model FLOPs
of the formula (`codi_jax.flops`) for MFU and positions per second. Collectives are read from the
optimized HLO with loop trip counts (`codi_jax.hlo.collectives`). docs/scale.md explains each
column.
"""

from __future__ import annotations

import collections
import math
import re
import time

from codi_jax import hlo
from codi_jax.models.memory import GiB, gib

SHORT = {
  "all-gather": "AG",
  "all-reduce": "AR",
  "reduce-scatter": "RS",
  "all-to-all": "A2A",
  "collective-permute": "CP",
}


def compile_program(p, chip, n_chips: int) -> dict:
  """Lowers and compiles `p` (`aot.Program`) for the active mesh; its row of the table."""
  t0 = time.perf_counter()
  try:
    compiled = p.lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return _exhausted(p, chip, str(e), time.perf_counter() - t0)
  compile_s = time.perf_counter() - t0
  text = compiled.as_text()
  m = hlo.memory(compiled)
  mem = {
    k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) if m is not None else 0
    for k in ("argument", "temp", "output", "alias", "generated_code")
  }
  need = (
    mem["argument"]
    + mem["temp"]
    + max(0, mem["output"] - mem["alias"])
    + mem["generated_code"]
    + p.extra_bytes
  )
  cost = hlo.cost(compiled)
  # What XLA's analysis leaves out: loop bodies beyond their first trip.
  loops = hlo.loop_costs(text, p.open_trips, cost)
  extra, once = loops if loops else ({}, len(hlo.loop_trips(text, p.open_trips)))
  xla_flops = float(cost.get("flops", float("nan"))) + extra.get("flops", 0.0)
  xla_bytes = float(cost.get("bytes accessed", 0)) + extra.get("bytes accessed", 0.0)
  step_s = max(xla_flops / chip.bf16_flops, xla_bytes / chip.hbm_bytes_s)
  ok = math.isfinite(step_s) and step_s > 0
  per_chip = p.model_flops / n_chips if p.model_flops else None
  train = p.kind == "train"
  return dict(
    program=p.name,
    kind=p.kind,
    detail=p.detail,
    batch=p.batch,
    tokens=p.tokens,
    **{f"{k}_bytes": v for k, v in mem.items()},
    extra_bytes=p.extra_bytes,
    need_bytes=need,
    hbm_bytes=chip.hbm_bytes,
    fits=need <= chip.hbm_bytes,
    compile_s=compile_s,
    cost_model_s=step_s,
    xla_flops=xla_flops,
    xla_bytes=xla_bytes,
    xla_once={k: float(cost.get(k, 0.0)) for k in hlo.COST_KEYS},  # XLA's own: loop bodies once
    model_flops=p.model_flops,
    mfu=per_chip / step_s / chip.bf16_flops if train and per_chip and ok else None,
    tokens_s_chip=p.tokens / n_chips / step_s if train and ok else None,
    collectives=hlo.collectives(text, p.open_trips),
    loops=[n for n in hlo.loop_trips(text, p.open_trips) if n > 1],
    loops_once=once,  # loops of unknown trip count, counted once (the step is then a lower bound)
    params=p.params,
  )


def _exhausted(p, chip, message: str, compile_s: float) -> dict:
  """The row of a program the TPU compiler refused for lack of HBM (its message kept)."""
  first = next((ln.strip() for ln in message.splitlines() if "RESOURCE_EXHAUSTED" in ln), "")
  nums = [float(x) for x in re.findall(r"\(([\d.]+)G\)", first)]
  temp = int(nums[0] * GiB) if nums else 0
  return dict(
    program=p.name,
    kind=p.kind,
    argument_bytes=p.arg_bytes,
    temp_bytes=temp,
    extra_bytes=p.extra_bytes,
    need_bytes=p.arg_bytes + temp + p.extra_bytes,
    hbm_bytes=chip.hbm_bytes,
    fits=False,
    compile_s=compile_s,
    xla=first.split("RESOURCE_EXHAUSTED:", 1)[-1].strip(),
    params=p.params,
  )


def progress(row: dict) -> str:
  return (
    f"compiled {row['program']} in {row['compile_s']:.1f} s: {gib(row['need_bytes'])} of "
    f"{gib(row['hbm_bytes'])} per chip"
  )


def lever(row: dict, mesh_shape: dict, n_chips: int) -> str:
  """The first change that lowers this program's per-chip memory."""
  p, train = row["params"], row["kind"] == "train"
  args = row["argument_bytes"]  # weights (+ optimizer state) dominate:
  weights = args >= row["hbm_bytes"] or args >= row["need_bytes"] / 2
  if weights:
    if train and mesh_shape.get("fsdp", 1) < n_chips:
      return f"fsdp (shard weights and optimizer state over more chips: --mesh=fsdp:{n_chips})"
    if mesh_shape.get("tensor", 1) < n_chips:
      return f"tensor (split heads, MLP and vocabulary: --mesh=tensor:{n_chips})"
    if p.get("f32_weights"):
      return "bf16 (--config.model.dtype=bfloat16 --config.model.param_dtype=bfloat16)"
    return "more chips (a larger --topology)"
  if train and not p.get("remat"):
    return "remat (--config.codi.remat_teacher=True --config.codi.remat_thoughts=True)"
  if train:
    return "batch (lower --config.data.batch_size, raise --config.optim.grad_accum)"
  return "batch (lower --config.eval.batch_size, or --batch_size for soft presets)"


def refusal(row: dict, chip, topology: str, mesh_shape: dict) -> str:
  """The one line that ends a run whose program does not fit a chip."""
  n = math.prod(mesh_shape.values())
  xla = f" (XLA: {row['xla']})" if row.get("xla") else ""
  return (
    f"{row['program']} needs {gib(row['need_bytes'])} per chip on {topology} (arguments "
    f"{gib(row['argument_bytes'])}, temporaries {gib(row['temp_bytes'] + row['extra_bytes'])}), "
    f"more than the {gib(chip.hbm_bytes)} HBM of a {chip.name}{xla}; lever: "
    f"{lever(row, mesh_shape, n)}"
  )


def header(topology: str, chip, mesh_shape: dict, config, soft: bool) -> str:
  model = config.model if soft else (config.model.spec or f"scratch {config.model.arch}")
  mesh = ",".join(f"{k}:{v}" for k, v in mesh_shape.items())
  return (
    f"\n{topology} ({chip.name}: {gib(chip.hbm_bytes)} HBM, {chip.bf16_flops / 1e12:g} TFLOP/s "
    f"bf16 per chip), mesh {mesh}, model {model}\n"
  )


def _collectives(c: dict) -> str:
  return " ".join(f"{SHORT[k]} {n}x {gib(b)}" for k, (n, b) in c.items()) or "-"


def _loops(trips: list[int]) -> str:
  """Trip counts, most frequent first: "12 (x13), 5 (x2), 112"."""
  counts = collections.Counter(trips).most_common()
  return ", ".join(f"{n}" + (f" (x{c})" if c > 1 else "") for n, c in counts) or "-"


def _fmt(x, spec: str) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "-"
  return f"{100 * x:.1f}%" if spec == "%" else format(x, spec)


COLUMNS = (
  ("program", "program"),
  ("detail", "shapes"),
  ("batch", "batch"),
  ("args", "args/chip"),
  ("temp", "temp/chip"),
  ("out", "out/chip"),
  ("hbm", "total / HBM"),
  ("compile_s", "compile s"),
  ("ms", "step ms (cost model)"),
  ("tflop", "model TFLOP"),
  ("mfu", "MFU (cost model)"),
  ("tok", "tok/s/chip (cost model)"),
  ("coll", "collectives/chip (count, bytes)"),
  ("loops", "loops"),
)


def table(rows: list[dict]) -> str:
  """A markdown table, one line per program."""
  cells = [[h for _, h in COLUMNS]]
  for r in rows:
    low, high = (">=", "<=") if r["loops_once"] else ("", "")  # some loop body counted once
    cells.append(
      [
        r["program"],
        r["detail"],
        str(r["batch"]),
        gib(r["argument_bytes"]),
        gib(r["temp_bytes"] + r["extra_bytes"]),
        gib(max(0, r["output_bytes"] - r["alias_bytes"])),
        f"{gib(r['need_bytes'])} / {100 * r['need_bytes'] / r['hbm_bytes']:.0f}%",
        f"{r['compile_s']:.1f}",
        low + _fmt(1e3 * r["cost_model_s"], ".3g"),
        _fmt(r["model_flops"] / 1e12 if r["model_flops"] else None, ".4g"),
        (high if r["mfu"] else "") + _fmt(r["mfu"], "%"),
        (high if r["tokens_s_chip"] else "") + _fmt(r["tokens_s_chip"], ",.0f"),
        _collectives(r["collectives"]),
        _loops(r["loops"]),
      ]
    )
  widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def footer() -> str:
  return (
    "\nPer chip. total = arguments + temporaries + outputs not aliased to arguments + code (+ the "
    "previous cache bucket during a decode's last growth). step ms, MFU and tok/s/chip are a cost "
    "model, not measured: max(XLA FLOPs / bf16 peak, XLA bytes accessed / HBM bandwidth), each "
    "loop body (trip counts under `loops`: thoughts, scanned layers, loss chunks, decode steps) "
    "counted its trip count times; a loop whose trip count the HLO does not state is counted "
    "once, and the step is then a lower bound (>=), MFU and tok/s upper bounds (<=). MFU = "
    "formula model FLOPs per chip / that step / bf16 peak; tok/s/chip = positions trained per "
    "step / step / chips. Collectives count each loop body times its trip count. docs/scale.md."
  )
