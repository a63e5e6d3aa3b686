"""Checkpoints: exact resume after SIGKILL, SIGTERM saves and exits 0 (Ctrl-C: exit 130), damaged
checkpoints are skipped, a non-finite loss leaves the last good checkpoint, config changes are
refused."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import cli_util
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_codi

from codi_jax import train_lib
from codi_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40


def _cmd(workdir, *overrides):
  return [
    sys.executable,
    "-m",
    "codi_jax.train",
    "--config=tests/tiny_codi.py",
    f"--workdir={workdir}",
    f"--config.optim.num_steps={STEPS}",
    "--config.eval.every_steps=20",
    "--config.checkpoint.every_steps=2",
    "--config.model.dropout=0.1",
    *overrides,
  ]  # dropout on: resume must also restore the RNG stream


def _env():
  # The worker's compile cache: every run here compiles the same programs (a cache hit is the
  # same executable, so bitwise comparisons hold); none when run outside the suite's conftest.
  return {**os.environ, "JAX_PLATFORMS": "cpu", "CODI_JAX_CACHE": cli_util.worker_cache() or ""}


def _train(workdir, *overrides, timeout=300):
  r = subprocess.run(
    _cmd(workdir, *overrides),
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _start_and_wait(workdir, min_step, sig):
  """Starts a run, waits until a checkpoint >= min_step is complete, sends `sig`; returns the process."""
  proc = subprocess.Popen(
    _cmd(workdir), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if any(s >= min_step for s in _steps(workdir)):
      proc.send_signal(sig)
      break
    time.sleep(0.01)
  out, err = proc.communicate(timeout=240)
  return proc, out, err


def _final_params(workdir):
  with ocp.StandardCheckpointer() as ckpt:
    tree = ckpt.restore(os.path.join(workdir, "final", "params"))
  return {"/".join(map(str, k)): np.asarray(v) for k, v in _flatten(tree).items()}


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def _assert_bitwise_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Final parameters of the run the interrupted ones must equal (same config and seed)."""
  ref = tmp_path_factory.mktemp("ref")
  _train(ref)
  return _final_params(ref)


def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(tmp_path, uninterrupted):
  run = tmp_path / "killed"
  kill_after = random.Random().randrange(2, STEPS - 8, 2)
  proc, _, _ = _start_and_wait(run, kill_after, signal.SIGKILL)
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  assert not (run / "final").exists()
  r = _train(run)
  resumed = [line for line in r.stdout.splitlines() if line.startswith("resumed from")]
  assert resumed, r.stdout[-2000:]
  _assert_bitwise_equal(uninterrupted, _final_params(run))
  steps = [
    json.loads(x)["step"]
    for x in (run / "metrics.jsonl").read_text().splitlines()
    if "loss" in json.loads(x)
  ]
  assert steps == list(range(1, STEPS + 1)), "metrics past the restored step must not be duplicated"


def test_sigterm_saves_exits_zero_and_resumes(tmp_path):
  proc, out, err = _start_and_wait(tmp_path, 4, signal.SIGTERM)
  assert proc.returncode == 0, err[-2000:]
  line = [x for x in out.splitlines() if x.startswith("preempted at step")]
  assert line, out[-2000:]
  step = int(line[0].split()[3].rstrip(":"))
  assert step in _steps(tmp_path) and not (tmp_path / "final").exists()
  r = _train(tmp_path)
  assert f"resumed from {tmp_path / 'checkpoints'}/{step} " in r.stdout
  assert (tmp_path / "final" / "run.json").exists()


def test_sigint_saves_in_one_line_exits_130_and_resumes_bitwise_exact(tmp_path, uninterrupted):
  """Ctrl-C mid-training: as SIGTERM, a checkpoint at the next step boundary, then one line on
  stderr and exit 130; the rerun ends equal to an uninterrupted run."""
  run = tmp_path / "interrupted"
  proc, out, err = _start_and_wait(run, 4, signal.SIGINT)
  assert proc.returncode == 130, err[-2000:]
  assert "Traceback" not in err and "preempted" not in out
  last = err.strip().splitlines()[-1]
  assert last.startswith("codi_jax.train: interrupted at step "), err[-2000:]
  step = int(last.split()[4].rstrip(":"))
  assert f"checkpoint {run / 'checkpoints'}/{step} written" in last
  assert step in _steps(run) and not (run / "final").exists()
  r = _train(run)
  assert f"resumed from {run / 'checkpoints'}/{step} " in r.stdout
  _assert_bitwise_equal(uninterrupted, _final_params(run))


def _tiny(steps=6, every=2):
  c = tiny_codi.get_config()
  c.optim.num_steps, c.checkpoint.every_steps, c.eval.every_steps = steps, every, steps
  c.checkpoint.keep = 3
  return c


def test_damaged_or_half_written_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
  ref = tmp_path / "ref"
  train_lib.train_and_evaluate(_tiny(), str(ref))
  run = tmp_path / "run"
  shutil.copytree(ref, run)
  shutil.rmtree(run / "final")  # as if the job died after its last checkpoint
  ckpts = run / "checkpoints"
  assert _steps(run) == [2, 4, 6]
  for f in (ckpts / "6" / "state").rglob("*"):  # truncate every file of the newest state
    if f.is_file():
      f.write_bytes(b"")
  half = ckpts / "8.orbax-checkpoint-tmp-1700000000"  # a save that never finished
  half.mkdir()
  (half / "junk").write_text("x")
  capsys.readouterr()
  summary = train_lib.train_and_evaluate(_tiny(), str(run))
  out = capsys.readouterr().out
  assert "checkpoints/6 is unreadable" in out
  assert summary["resumed_from"] == 4
  assert (tmp_path / "run" / "checkpoints.corrupt" / "6").is_dir()
  assert not half.exists()
  _assert_bitwise_equal(_final_params(ref), _final_params(run))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  c = _tiny(steps=30, every=1)
  c.optim.lr, c.optim.warmup_ratio, c.optim.clip = 1e9, 0.0, 1e9
  with pytest.raises(FloatingPointError, match="non-finite loss"):
    train_lib.train_and_evaluate(c, str(tmp_path))
  assert not (tmp_path / "final").exists()
  steps = _steps(tmp_path)
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  finite = [x["step"] for x in lines if "loss" in x and np.isfinite(x["loss"])]
  assert steps and max(steps) <= max(finite)  # nothing saved past the last finite loss
  # The newest checkpoint restores: resuming reaches the same failure again, not a load error.
  c.resume = True
  with pytest.raises(FloatingPointError):
    train_lib.train_and_evaluate(c, str(tmp_path))


def test_cli_reports_non_finite_loss_in_one_line(tmp_path):
  r = subprocess.run(
    _cmd(
      tmp_path,
      "--config.optim.lr=1e9",
      "--config.optim.clip=1e9",
      "--config.optim.warmup_ratio=0.0",
    ),
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert r.returncode == 1
  assert "non-finite loss" in r.stderr and "Traceback" not in r.stderr
  assert "last good checkpoint" in r.stderr


def test_resume_refuses_a_changed_config_and_an_unasked_restart(tmp_path):
  c = _tiny(steps=4)
  train_lib.train_and_evaluate(c, str(tmp_path))
  shutil.rmtree(tmp_path / "final")
  changed = _tiny(steps=4)
  changed.optim.lr = 1e-3
  with pytest.raises(InputError, match="optim differ"):
    train_lib.train_and_evaluate(changed, str(tmp_path))
  no_resume = _tiny(steps=4)
  no_resume.resume = False
  with pytest.raises(InputError, match="holds checkpoints"):
    train_lib.train_and_evaluate(no_resume, str(tmp_path))
  assert _steps(tmp_path) == [2, 4]  # neither refused run touched them
  other_mesh = _tiny(steps=4)
  other_mesh.checkpoint.keep = 4  # allowed: checkpoint/eval/mesh settings may change on resume
  assert train_lib.train_and_evaluate(other_mesh, str(tmp_path))["resumed_from"] == 4


def test_retention_keeps_the_newest_and_the_best(tmp_path):
  import grain  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from codi_jax import checkpoint  # pylint: disable=import-outside-toplevel

  ck = checkpoint.Checkpoints(str(tmp_path), save_every=1, keep=2, best_metric="acc")
  it = iter(grain.MapDataset.source(list(range(10))).to_iter_dataset())
  for step, acc in zip(range(1, 6), (0.1, 0.9, 0.2, 0.3, 0.4)):
    ck.save(step, {"params": {"w": jnp.full((2,), float(step))}}, it, {"step": step}, {"acc": acc})
  ck.save(6, {"params": {"w": jnp.zeros((2,))}}, it, {"step": 6})  # no validation at this step
  ck.close()
  assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [2, 5, 6]


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  import grain  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from codi_jax import checkpoint  # pylint: disable=import-outside-toplevel

  ck = checkpoint.Checkpoints(str(tmp_path / "c"), save_every=1)
  it = iter(grain.MapDataset.source(list(range(10))).to_iter_dataset())
  state = {"params": {"w": jnp.ones((3,))}, "step": np.zeros((), np.int32)}
  ck.save(1, state, it, {"process_count": 1})
  ck.wait()
  for f in (tmp_path / "c" / "1" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")
  abstract = {
    "params": {"w": jax.ShapeDtypeStruct((3,), jnp.float32)},
    "step": np.zeros((), np.int32),
  }
  with pytest.raises(InputError, match="none of the checkpoints"):
    ck.restore(abstract, it)
  ck.close()
  assert (tmp_path / "c.corrupt" / "1").is_dir()
