"""codi_jax.compile: a real compile for a TPU v5e topology from this CPU host (libtpu, the `tpu`
extra: CI installs it), the refusal of a program that cannot fit a chip, the one-line message
without libtpu, and CPU runs that stay quiet with libtpu installed."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (the tpu extra)")
# A tiny CODI run: the demo's model at 2 layers, short examples, small batches.
TINY = (
  "--config=configs/demo.py",
  "--config.model.num_layers=2",
  "--config.model.d_model=64",
  "--config.model.d_ff=128",
  "--config.data.batch_size=8",
  "--config.eval.batch_size=4",
  "--config.eval.max_new_tokens=8",
  "--lengths=question:12,cot:10,answer:4,steps:2",
)
LIBTPU_NOISE = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "libtpu", "InitGoogle")


def _run(*args, hide_libtpu=False, env=None, timeout=900, cache="") -> subprocess.CompletedProcess:
  """`python -m codi_jax.compile args` (hide_libtpu: as if the extra were not installed; cache:
  $CODI_JAX_CACHE)."""
  hide = "sys.modules['libtpu'] = None; " if hide_libtpu else ""
  code = (
    f"import runpy, sys; {hide}sys.argv = ['codi_jax.compile', *{list(args)!r}]; "
    "runpy.run_module('codi_jax.compile', run_name='__main__')"
  )
  return subprocess.run(
    [sys.executable, "-c", code],
    cwd=REPO,
    env=dict(os.environ if env is None else env, CODI_JAX_CACHE=str(cache)),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def _table(stdout: str) -> list[dict[str, str]]:
  lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
  cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
  return [dict(zip(cells[0], row)) for row in cells[2:]]


def test_without_libtpu_one_line_names_the_install():
  proc = _run(*TINY, "--topology=v5e:2x2", hide_libtpu=True)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("codi_jax.compile: error: "), proc.stderr
  assert "requirements-tpu.txt" in lines[0] and ".[tpu]" in lines[0], lines


def test_bad_topology_and_mesh_are_one_line():
  for args, needle in (
    (("--topology=v9z:2x2",), "v4, v5e, v5p, v6e"),
    (("--topology=v5e:2x2", "--mesh=data:3"), "3 devices"),
    (("--topology=v5e:2x2", "--mesh=pipe:4"), "axis:size"),
  ):
    if "--mesh=data:3" in args and not HAS_LIBTPU:
      continue  # the mesh is checked against the topology's devices
    proc = _run(*TINY, *args)
    assert proc.returncode == 2, (args, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)


@needs_libtpu
def test_compiles_a_tiny_run_for_v5e_2x2(tmp_path):
  out, cache = tmp_path / "rows.json", tmp_path / "xla"
  args = (*TINY, "--topology=v5e:2x2", "--methods=codi,coconut", f"--out={out}")
  proc = _run(*args, cache=cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not any(n in proc.stderr for n in LIBTPU_NOISE), proc.stderr
  # No persistent cache entry: a TPU executable cannot be read back without a TPU client (jax
  # warns on every read), and the programs are never run here.
  assert not cache.exists() or not os.listdir(cache), os.listdir(cache)
  rows = _table(proc.stdout)
  assert [r["program"] for r in rows] == [
    "train codi",
    "train coconut",
    "decode student",
    "decode teacher",
  ], proc.stdout
  assert "mesh data:4,fsdp:1,tensor:1" in proc.stdout and "TPU v5e" in proc.stdout
  saved = json.loads(out.read_text())
  assert saved["topology"] == "v5e:2x2" and saved["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  for r in saved["rows"]:
    assert r["fits"] and 0 < r["need_bytes"] < r["hbm_bytes"] == 16 << 30, r
    assert r["argument_bytes"] > 0 and r["compile_s"] > 0 and r["cost_model_s"] > 0, r
  train = {r["program"]: r for r in saved["rows"] if r["kind"] == "train"}
  for r in train.values():
    assert r["model_flops"] > 0 and 0 < r["mfu"] < 1 and r["tokens_s_chip"] > 0, r
    # Data parallel over 4 chips: the gradients are summed across them.
    assert r["collectives"]["all-reduce"][0] >= 1, r["collectives"]
  # The thought scan (N = 6: 5 trips) and the scanned layers are loops the cost model counts once.
  assert 5 in train["train codi"]["loops"] and 2 in train["train codi"]["loops"]
  # Coconut trains no teacher pass and no projection: fewer model FLOPs than CODI.
  assert train["train coconut"]["model_flops"] < train["train codi"]["model_flops"]


@needs_libtpu
def test_a_program_that_cannot_fit_is_refused_in_one_line(tmp_path):
  """One 16k-wide layer in f32 with AdamW, replicated over 4 chips: ~48 GiB per 16 GiB chip."""
  out = tmp_path / "rows.json"
  proc = _run(
    *TINY,
    "--config.model.num_layers=1",
    "--config.model.d_model=16384",
    "--config.model.num_heads=16",
    "--config.model.d_ff=32768",
    "--topology=v5e:2x2",
    "--methods=codi",
    "--programs=train",
    f"--out={out}",
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  line = lines[0]
  assert line.startswith("codi_jax.compile: error: train codi needs "), line
  assert "16.00 GiB HBM of a TPU v5e" in line and "lever: fsdp" in line, line
  assert "|" not in proc.stdout and not out.exists()  # no table, nothing written


@needs_libtpu
def test_cpu_cli_stays_quiet_with_libtpu_installed(tmp_path):
  """A plain CPU run (JAX_PLATFORMS unset) that starts the backend and ends in a one-line error:
  stderr holds that line only, none of libtpu's start-up warnings."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "codi_jax.train",
      "--config=configs/demo.py",
      f"--workdir={tmp_path / 'run'}",
      "--config.data.batch_size=3",  # not a multiple of the 2 devices: read from the backend
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
    "codi_jax.train: error: --config.data.batch_size: got 3; expected a multiple of the 2 "
    "data-parallel devices (the mesh axes of the `batch` rule) and of the 1 processes"
  ], proc.stderr
  # libtpu prints its warnings only when no other process holds its lockfile; the platform
  # choice behind the quiet run does not depend on that.
  code = "from codi_jax import runtime; runtime.setup_cli(); import jax; print(jax.devices())"
  env["CODI_JAX_CACHE"] = ""
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0 and proc.stdout.startswith("[CpuDevice"), proc.stderr
  assert proc.stderr == "", proc.stderr


@pytest.mark.parametrize(
  "spec, arch, layers, d_model, kv_heads, vocab",
  [
    ("openai-community/gpt2", "gpt2", 12, 768, 12, 50257),
    ("meta-llama/Llama-3.2-1B-Instruct", "llama", 16, 2048, 8, 128256),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama", 32, 4096, 8, 128256),
    ("Qwen/QwQ-32B", "qwen2", 64, 5120, 8, 152064),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "qwen2", 64, 5120, 8, 152064),
  ],
)
def test_hub_ids_of_the_presets_resolve_offline(
  monkeypatch, spec, arch, layers, d_model, kv_heads, vocab
):
  """Abstract models need only the sizes: known hub ids never touch the network."""
  from codi_jax.models import loader

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  cfg, eos = loader.load_config(spec, dtype="bfloat16", param_dtype="bfloat16")
  got = (cfg.arch, cfg.num_layers, cfg.d_model, cfg.num_kv_heads, cfg.vocab_size)
  assert got == (arch, layers, d_model, kv_heads, vocab)
  assert isinstance(eos, int) and 0 <= eos < vocab and cfg.dtype == "bfloat16"


def test_model_config_json_replaces_the_hub(tmp_path):
  from codi_jax.errors import InputError
  from codi_jax.models import loader

  path = tmp_path / "config.json"
  path.write_text(
    json.dumps(
      {
        "model_type": "gpt2",
        "vocab_size": 100,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 64,
      }
    )
  )
  cfg, eos = loader.load_config("some-org/unknown-model", config_json=str(path))
  assert (cfg.num_layers, cfg.d_model, cfg.vocab_size, eos) == (2, 32, 100, None)
  with pytest.raises(InputError, match="config.json"):
    loader.load_config("x", config_json=str(tmp_path / "missing.json"))


_NESTED = """
import json, numpy as np, jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from codi_jax import hlo
devices = np.array(topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices)
rep = NamedSharding(Mesh(devices.reshape(4), ("d",)), P())

def decode(w, h):  # chunks of 8 steps until step 64 or a stop: the counter moves in the inner loop
  def chunk(c):
    return jax.lax.fori_loop(0, 8, lambda i, c: (c[0] + 1, jnp.tanh(c[1] @ w)), c)
  return jax.lax.while_loop(lambda c: (c[0] < 64) & (c[1].sum() < 1e9), chunk, (0, h))[1]

args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=rep) for s in ((256, 256), (8, 256))]
print(json.dumps(sorted(hlo.loop_trips(jax.jit(decode).lower(*args).compile().as_text(), 3))))
"""


@needs_libtpu
def test_a_counter_moved_by_an_inner_loop_is_not_a_trip_count():
  """libtpu's HLO states no trip counts: the outer loop's `n < 64` is not its trip count when an
  inner loop of 8 steps advances n (a decode's chunks); it is the caller's open count (here 3),
  not 64 (8 times the work counted)."""
  proc = subprocess.run(
    [sys.executable, "-c", _NESTED],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == [3, 8], proc.stdout
