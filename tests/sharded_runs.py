"""Driver for the multi-device tests: run in a subprocess whose XLA_FLAGS fix the CPU device count.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_runs.py train \
      --mesh=8,1,1 --mesh=2,4,1 --out=/tmp/r.json
  ... python tests/sharded_runs.py decode --mesh=8,1,1 --mesh=2,2,2 --out=/tmp/d.json

`train`: the tiny CODI run of tests/train_test.py on each mesh -> per-step losses (metrics.jsonl),
the partition spec of every trainable parameter after training, and the rules' expected specs.
`decode`: SoftDecoder (every mode) on a tiny random Llama, unsharded and on each mesh -> tokens.
`loss`: the CODI loss and gradient norm of one tiny batch on each mesh in Auto and in Explicit
sharding mode (or the error the Explicit run raised).
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
  from codi_jax.codi import build  # pylint: disable=import-outside-toplevel
  from codi_jax.data import sources  # pylint: disable=import-outside-toplevel

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
      with sharding.use_mesh(mesh, c.logical_axis_rules):
        train_recs, _, _ = sources.load_records(c)
        codi, _, _ = build.init_model(c, build.build_tokenizer(c, train_recs))
        state = nnx.state(codi, nnx.Param)
        specs = {
          ".".join(map(str, p)): str(v.get_value().sharding.spec)
          for p, v in nnx.to_flat_state(state)
        }
        want = {
          ".".join(map(str, p)): str(v.get_value().spec)
          for p, v in nnx.to_flat_state(sharding.state_shardings(state))
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
      with sharding.use_mesh(mesh):
        dec = decode.SoftDecoder(model, params, pad_id=0, eos_ids=[95])
        res = dec(prompts, max_new_tokens=12, seed=7, length_bucket=8)
      out["tokens"][f"{mode}/{name}"] = [r.tokens for r in res]
  return out


def run_loss(meshes):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jax.sharding import AxisType  # pylint: disable=import-outside-toplevel

  from codi_jax import sharding  # pylint: disable=import-outside-toplevel
  from codi_jax.codi.model import Codi, CodiOptions, codi_loss  # pylint: disable=import-outside-toplevel
  from codi_jax.models import config as mcfg  # pylint: disable=import-outside-toplevel
  from codi_jax.models import transformer  # pylint: disable=import-outside-toplevel
  from configs.base import LOGICAL_AXIS_RULES  # pylint: disable=import-outside-toplevel

  V, B = 64, 8
  rng = np.random.default_rng(0)

  def ids(n):
    return rng.integers(0, V - 3, (B, n)).astype(np.int32)

  host = {
    "encoder_ids": ids(6),
    "encoder_mask": np.ones((B, 6), bool),
    "decoder_ids": ids(5),
    "decoder_mask": np.ones((B, 5), bool),
    "decoder_labels": ids(5),
    "teacher_ids": ids(10),
    "teacher_mask": np.ones((B, 10), bool),
    "teacher_labels": ids(10),
    "decoder_distill_index": np.full((B,), 3, np.int32),
    "teacher_distill_index": np.full((B,), 7, np.int32),
  }
  out = {}
  for text in meshes:
    for kind in ("auto", "explicit"):
      axis = AxisType.Explicit if kind == "explicit" else AxisType.Auto
      shape = tuple(int(x) for x in text.split(","))
      mesh = jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(axis,) * 3)
      with sharding.use_mesh(mesh, LOGICAL_AXIS_RULES):
        codi = Codi(transformer.build(mcfg.tiny("gpt2", vocab_size=V), seed=1), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(codi)
        state = sharding.shard_state(state)
        batch = {k: sharding.put_batch(v) for k, v in host.items()}
        opts = CodiOptions(num_latent=2)

        def loss_and_norm(s, b, graphdef=graphdef, opts=opts):
          def fn(s_):
            return codi_loss(nnx.merge(graphdef, s_), b, opts)[0]

          loss, grads = jax.value_and_grad(fn)(s)
          return loss, optax.tree.norm(grads)

        try:
          loss, norm = jax.jit(loss_and_norm)(state, batch)
          out[f"{kind}/{text}"] = {"loss": float(loss), "grad_norm": float(norm)}
        except Exception as e:  # noqa: BLE001  (the test reports what Explicit mode raised)
          out[f"{kind}/{text}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
  return out


def main(argv):
  what = argv[1] if len(argv) > 1 else ""
  fn = {"train": run_train, "decode": run_decode, "loss": run_loss}.get(what)
  if fn is None:
    raise app.UsageError("first argument: train | decode | loss")
  from codi_jax import distributed  # pylint: disable=import-outside-toplevel

  distributed.maybe_initialize()
  result = fn(_MESH.value)
  if distributed.is_main():
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(result, f)


if __name__ == "__main__":
  app.run(main)
