r"""Compile every program of a run for a TPU topology from this host (no TPU, data or weights needed).

  python -m codi_jax.compile --config=configs/gpt2.py --topology=v5e:2x4
  python -m codi_jax.compile --config=configs/llama1b.py --topology=v5e:4x4 --mesh=fsdp:16
  python -m codi_jax.compile --config=configs/llama1b.py --topology=v5p:2x2x2 \
      --config.model.spec=meta-llama/Llama-3.1-8B-Instruct --methods=codi --mesh=fsdp:8
  python -m codi_jax.compile --config=configs/soft/qwq.py --topology=v5p:2x2x1

Builds the run as `codi_jax.train` does (config, mesh, logical-axis rules, shardings) on abstract
weights (`codi_jax.aot`) and compiles with libtpu's compiler for the topology's chips: the train
step of each --methods and the validation decoding of a training config, or the soft decoding of a
soft preset. Prints one table (docs/scale.md explains each column; times, MFU and tokens/s are
XLA's cost model, never measured). A program that needs more than a chip's HBM ends the command
with one line naming the lever and exit 2, before the table or --out is written. Needs the `tpu`
extra (libtpu); without it, one line says what to install.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from codi_jax import runtime
from codi_jax.errors import InputError, exit_on_input_error

PROG = "codi_jax.compile"
METHODS = ("codi", "cot_sft", "no_cot_sft", "coconut", "icot_si")
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py or configs/soft/*.py).", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x4, v5p:2x2x2, v6e:4x8.")
_MESH = flags.DEFINE_string(
  "mesh",
  "",
  "Mesh sizes, e.g. data:2,fsdp:8 (one may be -1; unnamed axes 1). Default: "
  "config.mesh (training), tensor over every chip (soft presets).",
)
_METHODS = flags.DEFINE_list("methods", list(METHODS), "Train steps to compile (training configs).")
_PROGRAMS = flags.DEFINE_list("programs", ["train", "decode"], "train, decode (training configs).")
_LENGTHS = flags.DEFINE_string(
  "lengths",
  "",
  "Example lengths in tokens, e.g. question:128,cot:64,answer:16,steps:6,prompt:512 "
  "(defaults: codi_jax/aot.py DEFAULT_LENGTHS).",
)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Soft presets: rows per decoder call.")
_MODEL_CONFIG = flags.DEFINE_string(
  "model_config", "", "A config.json for the model when its hub id is not known offline."
)
_OUT = flags.DEFINE_string("out", "", "Also write the table's rows as JSON here.")
flags.mark_flags_as_required(["config", "topology"])


def parse_mesh(text: str, default) -> dict:
  """--mesh "fsdp:8,tensor:2" -> {data, fsdp, tensor} sizes (unnamed axes 1); "" -> default."""
  from codi_jax import sharding  # pylint: disable=import-outside-toplevel

  if not text:
    return dict(default)
  sizes = {}
  for item in text.split(","):
    name, _, value = item.strip().partition(":")
    if name not in sharding.MESH_AXES or not value.lstrip("-").isdigit():
      raise InputError(
        f"--mesh: {item!r}; expected axis:size with axes {', '.join(sharding.MESH_AXES)}"
      )
    sizes[name] = int(value)
  return sizes


def programs(config, lengths: dict) -> list:
  """The programs to compile for a training config or a soft preset (inside the mesh context)."""
  from codi_jax import aot  # pylint: disable=import-outside-toplevel

  if "sampler" in config:  # a soft preset
    return [aot.soft_decode_program(config, _BATCH.value, lengths, _MODEL_CONFIG.value)]
  for name in _PROGRAMS.value:
    if name not in ("train", "decode"):
      raise InputError(f"--programs: unknown {name!r} (train, decode)")
  for m in _METHODS.value:
    if m not in METHODS:
      raise InputError(f"--methods: unknown {m!r}; choose from {', '.join(METHODS)}")
  out = []
  if "train" in _PROGRAMS.value:
    out += [aot.train_program(config, m, lengths, _MODEL_CONFIG.value) for m in _METHODS.value]
  if "decode" in _PROGRAMS.value:
    out += aot.codi_decode_programs(config, lengths, _MODEL_CONFIG.value)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime.setup_cli(compile_cache=False)  # topology compiles: no TPU client to load them back
  config = runtime.config_value(_CONFIG, PROG)
  with exit_on_input_error(PROG):
    from codi_jax import aot, report, sharding, tpu  # pylint: disable=import-outside-toplevel

    topology = _TOPOLOGY.value
    chip = tpu.chip(topology)
    soft = "sampler" in config
    sizes = parse_mesh(_MESH.value, {"tensor": -1} if soft else config.mesh)
    lengths = aot.parse_lengths(_LENGTHS.value)
    devices = tpu.devices(topology)
    chip = tpu.per_device(topology, len(devices))
    mesh = sharding.make_mesh(sizes, devices, where="--mesh")
    rules = config.logical_axis_rules
    rows = []
    with sharding.use_mesh(mesh, rules):
      for p in programs(config, lengths):
        row = report.compile_program(p, chip, len(devices))
        if not row["fits"]:
          raise InputError(report.refusal(row, chip, topology, dict(mesh.shape)))
        print(report.progress(row), flush=True)
        rows.append(row)
  print(report.header(topology, chip, dict(mesh.shape), config, soft))
  print(report.table(rows))
  print(report.footer())
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"topology": topology, "mesh": dict(mesh.shape), "rows": rows}, f, indent=1)
    print(f"wrote {_OUT.value}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.flags_parser(PROG))
