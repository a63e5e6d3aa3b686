"""Driver for the multi-device tests: run in a subprocess whose XLA_FLAGS fix the CPU device count.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_runs.py train \
      --mesh=8,1,1 --mesh=2,4,1 --out=/tmp/r.json
  ... python tests/sharded_runs.py decode --mesh=8,1,1 --mesh=2,2,2 --out=/tmp/d.json

`train`: the tiny CODI run of tests/train_test.py on each mesh -> per-step losses (metrics.jsonl),
the partition spec of every trainable parameter after training, and the rules' expected specs.
`decode`: SoftDecoder (every mode) on a tiny random Llama, unsharded and on each mesh -> tokens.
With --workdir, runs live (and stay) in <workdir>/<mesh>, so a test can resume one there. Under
launch/local.py every process runs this together (jax.distributed); process 0 writes the JSON.
"""
# pylint: disable=invalid-name

import contextlib
import json
import os
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_MESH = flags.DEFINE_multi_string("mesh", [], "data,fsdp,tensor sizes (repeat).")
_OUT = flags.DEFINE_string("out", None, "Output JSON.")
_STEPS = flags.DEFINE_integer("steps", 4, "Training steps.")
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Keep the runs in <workdir>/<mesh> (default: temporary)."
)
_CKPT = flags.DEFINE_integer("checkpoint_every", 0, "Checkpoint interval (0: only at the end).")


def _mesh_dict(text):
  d, f, t = (int(x) for x in text.split(","))
  return {"data": d, "fsdp": f, "tensor": t}


def train_config():
  from train_test import tiny_config  # pylint: disable=import-outside-toplevel

  c = tiny_config()
  c.model.vocab_size = 301  # + pad/bot/eot = 304 rows: divisible by every tensor size used here
  c.model.d_model, c.model.num_heads, c.model.d_ff = 32, 4, 64
  c.optim.num_steps = _STEPS.value
  c.eval.every_steps = _STEPS.value
  c.checkpoint.every_steps = _CKPT.value
  c.checkpoint.keep = 10
  return c


def run_train(meshes):
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from codi_jax import sharding, train_lib  # pylint: disable=import-outside-toplevel

  out = {"devices": jax.device_count(), "runs": {}}
  for text in meshes:
    c = train_config()
    c.mesh = _mesh_dict(text)
    with _workdir(text) as wd:
      summary = train_lib.train_and_evaluate(c, wd)
      with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(x) for x in f]
      # Parameter shardings: as the run creates them, and as the rules say they must be.
      mesh = sharding.make_mesh(c.mesh)
      rules = sharding.rules_from_config(c.logical_axis_rules)
      train_recs, _, _ = train_lib.load_records(c)
      codi, _, _ = train_lib.init_model(c, train_lib.build_tokenizer(c, train_recs), mesh, rules)
      state = nnx.state(codi, nnx.Param)
      specs = {
        ".".join(map(str, p)): str(v.get_value().sharding.spec) for p, v in nnx.to_flat_state(state)
      }
      want = {
        ".".join(map(str, p)): str(v.get_value().spec)
        for p, v in nnx.to_flat_state(sharding.state_shardings(state, mesh, rules))
      }
    out["runs"][text] = {
      "losses": [
        {k: x[k] for k in ("step", "loss", "ce_student", "ce_teacher", "distill")}
        for x in lines
        if "loss" in x
      ],
      "valid": {k: v for k, v in summary.items() if k.startswith("valid/")},
      "specs": specs,
      "rule_specs": want,
      "step_compiles": summary["step_compiles"],
      "resumed_from": summary["resumed_from"],
      "processes": jax.process_count(),
    }
  return out


@contextlib.contextmanager
def _workdir(mesh_text):
  if _WORKDIR.value:
    yield os.path.join(_WORKDIR.value, mesh_text)
  else:
    with tempfile.TemporaryDirectory() as wd:
      yield wd


def run_decode(meshes):
  import jax  # pylint: disable=import-outside-toplevel

  from codi_jax import sharding  # pylint: disable=import-outside-toplevel
  from codi_jax.models import config as mcfg  # pylint: disable=import-outside-toplevel
  from codi_jax.models import transformer  # pylint: disable=import-outside-toplevel
  from soft_jax import decode, sampling  # pylint: disable=import-outside-toplevel

  model = transformer.build(mcfg.tiny("llama", vocab_size=96, num_heads=4, num_kv_heads=2), seed=3)
  prompts = [
    [5, 9, 11, 3],
    [7, 2],
    [40, 41, 42, 43, 44, 45],
    [1],
    [8, 8, 8],
    [60, 61],
    [12, 13, 14],
    [90],
  ]
  out = {"devices": jax.device_count(), "tokens": {}}
  for mode in ("greedy", "soft", "dirichlet", "gumbel", "sample"):
    params = sampling.SamplerParams(
      mode=mode, temperature=0.8, top_k=20, top_p=0.95, max_topk=4, max_thinking_tokens=6
    )
    runs = {"none": None, **{m: sharding.make_mesh(_mesh_dict(m)) for m in meshes}}
    for name, mesh in runs.items():
      dec = decode.SoftDecoder(model, params, pad_id=0, eos_ids=[95], mesh=mesh)
      res = dec(prompts, max_new_tokens=12, seed=7, length_bucket=8)
      out["tokens"][f"{mode}/{name}"] = [r.tokens for r in res]
  return out


def main(argv):
  what = argv[1] if len(argv) > 1 else ""
  fn = {"train": run_train, "decode": run_decode}.get(what)
  if fn is None:
    raise app.UsageError("first argument: train | decode")
  from codi_jax import distributed  # pylint: disable=import-outside-toplevel

  distributed.maybe_initialize()
  result = fn(_MESH.value)
  if distributed.is_main():
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(result, f)


if __name__ == "__main__":
  app.run(main)
