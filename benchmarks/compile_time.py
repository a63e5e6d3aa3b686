r"""Compile time of the CODI train step, layers unrolled vs scanned (`model.scan_layers`).

  python benchmarks/compile_time.py                      # both cases below (~15 min on 2 cores)
  python benchmarks/compile_time.py --cases=depth        # tiny model at 30 and 60 layers only
  python benchmarks/compile_time.py --cases=smollm2 --out=compile.json

Cases, each program compiled in a fresh process (persistent compile cache off) for this host's CPU,
with abstract weights (`codi_jax.aot.train_program`: the step `codi_jax.train` compiles, on
shapes):
- smollm2: `configs/smollm2.py` (SmolLM2-135M, 30 layers, LoRA r=128), unrolled vs scanned;
- depth: `configs/demo.py`'s d=128 model at 30 and 60 layers, scanned and unrolled.
Example lengths: `aot.DEFAULT_LENGTHS` (a long GSM8k-Aug example). Prints one table and the two
ratios the scan is for; never asserts a speed. The load average is printed with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
CASES = {
  "smollm2": [("configs/smollm2.py", 0, False), ("configs/smollm2.py", 0, True)],
  "depth": [
    ("configs/demo.py", 30, True),
    ("configs/demo.py", 60, True),
    ("configs/demo.py", 30, False),
    ("configs/demo.py", 60, False),
  ],
}


def _define_flags():
  flags.DEFINE_list("cases", list(CASES), f"which cases: {', '.join(CASES)}")
  flags.DEFINE_string("out", "", "also write the rows as JSON here")
  flags.DEFINE_string("one", "", "internal: measure one config,layers,scan in this process")


def measure(config_path: str, layers: int, scan: bool) -> dict:
  """Lowers and compiles one CODI train step; seconds of each stage."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  from codi_jax import aot, sharding  # pylint: disable=import-outside-toplevel

  spec = importlib.util.spec_from_file_location("cfg", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.scan_layers = scan
  if layers:
    config.model.num_layers = layers
  mesh = sharding.make_mesh(config.mesh)
  with sharding.use_mesh(mesh, sharding.rules_from_config(config.logical_axis_rules)):
    t0 = time.perf_counter()
    program = aot.train_program(config, "codi", aot.DEFAULT_LENGTHS)
    t1 = time.perf_counter()
    lowered = program.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
  return {
    "config": config_path,
    "layers": layers or None,
    "scan": scan,
    "build_s": round(t1 - t0, 2),
    "lower_s": round(t2 - t1, 2),
    "compile_s": round(t3 - t2, 2),
    "hlo_chars": len(lowered.as_text()),
  }


def run_one(config_path: str, layers: int, scan: bool) -> dict:
  """`measure` in a fresh process: no program of an earlier case is reused."""
  env = dict(os.environ, CODI_JAX_CACHE="", JAX_PLATFORMS="cpu")
  arg = f"--one={config_path},{layers},{int(scan)}"
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), arg],
    env=env,
    capture_output=True,
    text=True,
    check=False,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  if proc.returncode:
    raise SystemExit(f"{arg} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
  head = "| config | layers | layout | lower s | compile s | lowered module (chars) |"
  lines = [head, "|---|---|---|---|---|---|"]
  for r in rows:
    layout = "scanned" if r["scan"] else "unrolled"
    lines.append(
      f"| {r['config']} | {r['layers'] or 'config'} | {layout} | {r['lower_s']:.1f} | "
      f"{r['compile_s']:.1f} | {r['hlo_chars']:,} |"
    )
  return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
  """The two figures the scan is for: SmolLM2 unrolled / scanned, and 60 / 30 layers scanned."""
  by = {(r["config"], r["layers"], r["scan"]): r["lower_s"] + r["compile_s"] for r in rows}
  out = []
  smol = [by.get(("configs/smollm2.py", None, s)) for s in (False, True)]
  if all(smol):
    out.append(f"SmolLM2 CODI step, unrolled / scanned (lower + compile): {smol[0] / smol[1]:.1f}x")
  for scan in (True, False):
    d = [by.get(("configs/demo.py", n, scan)) for n in (30, 60)]
    if all(d):
      name = "scanned" if scan else "unrolled"
      out.append(f"d=128 model, 60 / 30 layers, {name}: {d[1] / d[0]:.2f}x")
  return out


def main(argv):
  del argv
  if FLAGS.one:
    path, layers, scan = FLAGS.one.split(",")
    print(json.dumps(measure(path, int(layers), bool(int(scan)))))
    return
  load = os.getloadavg()
  print(f"load average at start: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}", flush=True)
  rows = []
  for case in FLAGS.cases:
    if case not in CASES:
      raise app.UsageError(f"--cases: unknown {case!r}; choose from {', '.join(CASES)}")
    for path, layers, scan in CASES[case]:
      row = run_one(path, layers, scan)
      print(json.dumps(row), flush=True)
      rows.append(row)
  print(table(rows))
  for line in ratios(rows):
    print(line)
  end = os.getloadavg()
  print(f"load average at end: {end[0]:.1f} / {end[1]:.1f} / {end[2]:.1f}")
  if FLAGS.out:
    with open(FLAGS.out, "w", encoding="utf-8") as f:
      json.dump({"rows": rows, "load_start": load, "load_end": end}, f, indent=1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
