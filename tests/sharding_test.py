"""Meshes, logical-axis rules and sharded runs (8 simulated CPU devices, in subprocesses).

The device count is fixed by XLA_FLAGS before JAX starts, so every multi-device case runs
tests/sharded_runs.py in a fresh process; the in-process tests only use the rules.
"""

import json
import os
import shutil
import subprocess
import sys

import cli_util
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from codi_jax import sharding
from codi_jax.errors import InputError
from codi_jax.models.partitioning import spec_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("8,1,1", "2,4,1", "2,2,2")


def _run(kind, meshes, devices, tmp_path, *extra, processes=1):
  out = tmp_path / f"{kind}_{devices}x{processes}.json"
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "CODI_JAX_CACHE": cli_util.worker_cache() or "",  # programs repeated across tests compile once
  }
  args = [
    sys.executable,
    os.path.join(ROOT, "tests", "sharded_runs.py"),
    kind,
    f"--out={out}",
    *extra,
  ]
  if processes > 1:  # the real thing: N processes on loopback, joined by jax.distributed (gloo)
    args = [
      sys.executable,
      os.path.join(ROOT, "launch", "local.py"),
      f"--num_processes={processes}",
      f"--devices_per_process={devices}",
      "--",
    ] + args
  r = subprocess.run(
    args + [f"--mesh={m}" for m in meshes],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  return json.loads(out.read_text())


KEYS = ("loss", "ce_student", "ce_teacher", "distill")


def _losses(run):
  return np.array([[x[k] for k in KEYS] for x in run["losses"]])


class FakeMesh:
  def __init__(self, **shape):
    self.shape = shape


RULES = sharding.rules_from_config(sharding.DEFAULT_RULES)


def test_config_rules_equal_the_library_fallback():
  """configs/base.py carries the rules as commented data; the library's fallback is the same map."""
  from configs import base  # pylint: disable=import-outside-toplevel

  assert sharding.rules_from_config(base.LOGICAL_AXIS_RULES) == RULES


def test_spec_for_rules_divisibility_and_reuse():
  mesh = FakeMesh(data=2, fsdp=2, tensor=2)
  assert spec_for(("embed", "mlp"), (32, 64), mesh, RULES) == P("fsdp", "tensor")
  assert spec_for(("mlp", "embed"), (64, 32), mesh, RULES) == P("tensor", "fsdp")
  assert spec_for(("vocab", "embed"), (303, 32), mesh, RULES) == P(
    None, "fsdp"
  )  # 303 % 2: replicated
  assert spec_for(("batch", None), (8, 5), mesh, RULES) == P(("data", "fsdp"))
  assert spec_for(("batch", None), (6, 5), mesh, RULES) == P(
    "data"
  )  # 6 % 4: the trailing axis drops
  assert spec_for(("heads", "mlp"), (8, 8), mesh, RULES) == P("tensor")  # one mesh axis per array
  assert spec_for((None,), (4,), mesh, RULES) == P()
  assert (
    spec_for(("embed",), (32,), FakeMesh(data=8, fsdp=1, tensor=1), RULES) == P()
  )  # size-1 axes drop


def test_mesh_shape_inference_and_errors():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  assert sharding.mesh_shape({"data": 1, "fsdp": 1, "tensor": -1}, 8) == (1, 1, 8)
  for sizes, msg in [
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": 3, "tensor": -1}, "does not divide"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "uses 4 devices"),
    ({"pipeline": 2}, "unknown mesh axes"),
    ({"data": 0}, "positive"),
  ]:
    with pytest.raises(InputError, match=msg):
      sharding.mesh_shape(sizes, 8)
  with pytest.raises(InputError, match="unknown mesh axes"):
    sharding.rules_from_config([("embed", "model")])
  with pytest.raises(InputError, match="not a"):
    sharding.rules_from_config([("embed",)])
  assert sharding.rules_from_config([["batch", ["data", "fsdp"]], ["embed", None]]) == {
    "batch": ("data", "fsdp"),
    "embed": (),
  }  # the JSON form a saved config comes back in


def test_single_device_mesh_places_everything_replicated():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  with sharding.use_mesh(mesh, RULES):
    x = sharding.put_batch(np.arange(6).reshape(3, 2))
  assert x.sharding.spec == P() and np.asarray(x).tolist() == [[0, 1], [2, 3], [4, 5]]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The 1-device reference run (4 steps, checkpoints at 2 and 4), kept in <dir>/1,1,1."""
  d = tmp_path_factory.mktemp("ref")
  return d, _run("train", ["1,1,1"], 1, d, f"--workdir={d}", "--checkpoint_every=2")["runs"][
    "1,1,1"
  ]


def test_codi_training_on_meshes_matches_one_device(tmp_path, one_device):
  ref_dir, ref = one_device
  want = _losses(ref)
  assert want.shape == (4, 4) and np.all(np.isfinite(want))
  # 1,4,2 resumes the 1-device run's step-2 checkpoint: restore onto another mesh and device count.
  shutil.copytree(ref_dir / "1,1,1", tmp_path / "1,4,2")
  shutil.rmtree(tmp_path / "1,4,2" / "final")
  shutil.rmtree(tmp_path / "1,4,2" / "checkpoints" / "4")
  runs = _run(
    "train", MESHES + ("1,4,2",), 8, tmp_path, f"--workdir={tmp_path}", "--checkpoint_every=2"
  )
  assert runs["devices"] == 8
  for mesh in MESHES + ("1,4,2",):
    r = runs["runs"][mesh]
    np.testing.assert_allclose(_losses(r), want, rtol=0, atol=1e-5, err_msg=f"mesh {mesh}")
    assert r["step_compiles"] == 1
    assert r["specs"] == r["rule_specs"], f"mesh {mesh}: parameter shardings differ from the rules"
  assert [runs["runs"][m]["resumed_from"] for m in MESHES + ("1,4,2",)] == [None, None, None, 2]
  specs = runs["runs"]["2,2,2"]["specs"]  # what the rules mean for a GPT-2 block on (2, 2, 2)
  # Stacked blocks: the leading layer axis is never split.
  assert specs["backbone.blocks.c_attn.kernel"] == str(P(None, "fsdp", "tensor"))
  assert specs["backbone.blocks.mlp_c_proj.kernel"] == str(P(None, "tensor", "fsdp"))
  assert specs["backbone.embed.embedding"] == str(P("tensor", "fsdp"))
  assert specs["prj.w1"] == str(P("fsdp", "tensor"))
  assert set(runs["runs"]["8,1,1"]["specs"].values()) == {
    str(P())
  }  # pure data parallel: replicated


def test_two_processes_on_loopback_match_one_process(tmp_path, one_device):
  _, ref = one_device
  r = _run("train", ["2,2,1"], 2, tmp_path, f"--workdir={tmp_path}", processes=2)["runs"]["2,2,1"]
  assert r["processes"] == 2 and r["step_compiles"] == 1
  np.testing.assert_allclose(_losses(r), _losses(ref), rtol=0, atol=1e-5)
  assert r["specs"] == r["rule_specs"]
  assert (
    tmp_path / "2,2,1" / "final" / "run.json"
  ).exists()  # process 0 wrote it, both wrote params


def test_soft_decode_loop_identical_sharded_and_unsharded(tmp_path):
  res = _run("decode", ["8,1,1", "2,2,2", "1,1,8"], 8, tmp_path)["tokens"]
  for mode in ("greedy", "soft", "dirichlet", "gumbel", "sample"):
    ref = res[f"{mode}/none"]
    assert len(ref) == 8 and all(1 <= len(t) <= 12 for t in ref) and sum(map(len, ref)) > 60
    for mesh in ("8,1,1", "2,2,2", "1,1,8"):
      assert res[f"{mode}/{mesh}"] == ref, f"{mode} on mesh {mesh}"


@pytest.fixture(scope="module")
def loss_runs(tmp_path_factory):
  return _run("loss", ("1,1,1", "2,2,1"), 4, tmp_path_factory.mktemp("loss"))


def test_auto_mode_loss_is_mesh_independent(loss_runs):
  one, four = loss_runs["auto/1,1,1"], loss_runs["auto/2,2,1"]
  np.testing.assert_allclose(four["loss"], one["loss"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(four["grad_norm"], one["grad_norm"], rtol=1e-5)


@pytest.mark.xfail(
  strict=True,
  reason="Explicit sharding mode: jax 0.10 supports it, but the model code does not yet pass "
  "out_sharding= to its gathers and contractions (the first failure is the embedding lookup's "
  "ShardingTypeError); only Auto mode (GSPMD) is supported. Strict: passing means it now works.",
)
def test_explicit_mode_loss_equals_auto(loss_runs):
  explicit = loss_runs["explicit/2,2,1"]
  assert "error" not in explicit, explicit.get("error")
  np.testing.assert_allclose(explicit["loss"], loss_runs["auto/2,2,1"]["loss"], atol=1e-5)
