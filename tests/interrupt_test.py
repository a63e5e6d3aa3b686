"""Every wait can be interrupted: SIGINT or SIGTERM during the train step's compile ends the run
(one line, exit 130 / 143) without waiting for XLA, which holds the thread; the compile announces
itself first. (Ctrl-C between steps checkpoints: checkpoint_test.py.)"""

import os
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import pytest
import tiny_codi

from codi_jax import checkpoint, train_lib, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_until_compiling(workdir, sig) -> tuple[int, str, str]:
  """Trains a config whose step compile is long (6 unrolled layers: over a minute on a 2-core CPU)
  and sends `sig` once the "compiling the train step" notice is out; (exit code, stdout, stderr).
  Fails if the step compiled anyway (the signal was held off until XLA returned)."""
  cmd = [
    sys.executable,
    "-m",
    "codi_jax.train",
    "--config=tests/tiny_codi.py",
    f"--workdir={workdir}",
    "--config.model.scan_layers=False",
    "--config.model.num_layers=6",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "CODI_JAX_CACHE": ""}  # no cache hit: a real compile
  proc = subprocess.Popen(
    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  out = []
  for line in proc.stdout:
    out.append(line)
    if line.startswith("compiling the train step"):
      proc.send_signal(sig)
      break
  try:
    rest, err = proc.communicate(timeout=600)
  finally:
    proc.kill()
  return proc.returncode, "".join(out) + rest, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_the_compile_ends_the_run_in_one_line(tmp_path, sig):
  code, out, err = _run_until_compiling(tmp_path, sig)
  assert code == 128 + sig, err[-3000:]
  assert "compiling the train step: " in out and "HLO ops" in out
  assert "compiled train step" not in out, "the signal waited for the compile"
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"codi_jax.train: {signal.Signals(sig).name} while compiling"), err
  assert "nothing to save yet" in last and "rerun the same command" in last
  ckpts = tmp_path / "checkpoints"
  assert not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir())


def test_a_signal_during_a_later_compile_keeps_the_steps_done(tmp_path, monkeypatch):
  """A compile after step 2 (Coconut compiles one per stage) cut short by a signal: step 2, not yet
  due for a checkpoint, is saved before the run ends, and the rerun resumes from it."""
  c = tiny_codi.get_config()
  c.optim.num_steps, c.checkpoint.every_steps, c.eval.every_steps = 4, 100, 4
  step_fn = train_lib.Trainer._step_fn  # pylint: disable=protected-access

  def interrupted_at_3(self, step, preemption=None):
    if step == 3:
      raise checkpoint.Interrupted("SIGINT while compiling the train step", 130, True)
    return step_fn(self, step, preemption)

  monkeypatch.setattr(train_lib.Trainer, "_step_fn", interrupted_at_3)
  with pytest.raises(checkpoint.Interrupted) as info:
    train_lib.train_and_evaluate(c, str(tmp_path))
  ckpt = tmp_path / "checkpoints" / "2"
  assert info.value.message == (
    f"SIGINT while compiling the train step for step 3: checkpoint {ckpt} written; rerun the "
    "same command to resume"
  )
  assert (info.value.code, info.value.abandoned) == (130, True) and ckpt.is_dir()
  monkeypatch.setattr(train_lib.Trainer, "_step_fn", step_fn)
  assert train_lib.train_and_evaluate(c, str(tmp_path))["resumed_from"] == 2


@pytest.fixture
def handlers():
  """Preemption installed in this (main) thread; the old handlers back afterwards."""
  old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  p = checkpoint.Preemption()
  yield p
  p.close()
  assert {s: signal.getsignal(s) for s in old} == old


def test_wait_returns_a_result_and_raises_an_error(handlers):
  assert handlers.wait(lambda: 42, "adding") == 42
  with pytest.raises(ZeroDivisionError):
    handlers.wait(lambda: 1 / 0, "dividing")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_a_wait_that_would_never_end(handlers, sig):
  """fn blocks until released, so only the signal can end the wait; afterwards both signals have
  their default action (a second one ends the process at once)."""
  release = threading.Event()
  timer = threading.Timer(0.2, os.kill, (os.getpid(), sig))
  timer.start()
  try:
    with pytest.raises(checkpoint.Interrupted) as info:
      handlers.wait(release.wait, "waiting forever")
  finally:
    release.set()
    timer.cancel()
  e = info.value
  assert (e.code, e.abandoned) == (128 + sig, True)
  assert e.message == f"{signal.Signals(sig).name} while waiting forever"
  assert handlers.reached(1)
  assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_signal_before_the_wait_starts_nothing(handlers):
  handlers._on_signal(signal.SIGINT, None)  # pylint: disable=protected-access
  calls = []
  with pytest.raises(checkpoint.Interrupted) as info:
    handlers.wait(lambda: calls.append(1), "compiling")
  assert not info.value.abandoned and not calls


def test_compile_notice_gives_the_size_the_cpu_estimate_and_the_cache():
  lowered = jax.jit(lambda x: jnp.sin(x) @ x.T + 1).lower(jnp.ones((4, 4)))
  jax.config.update("jax_compilation_cache_dir", "/tmp/somewhere")
  try:
    line = train_step.compile_notice(lowered)
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
  ops = int(line.split(": ")[1].split()[0].replace(",", ""))
  assert 3 <= ops < 20, line
  assert f"about {ops * train_step.CPU_SECONDS_PER_OP:.0f} s on a CPU" in line
  assert "/tmp/somewhere ($CODI_JAX_CACHE)" in line and "Ctrl-C" in line
  assert "compile cache is off" in train_step.compile_notice(lowered)
