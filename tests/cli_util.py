"""The one-line errors users see: a `python -m` entry point run in a subprocess and its usage
errors, or an InputError raised in process."""

import os
import subprocess
import sys

import pytest

from codi_jax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(
  prog: str, tmp_path, *args, timeout=600, extra_env=None
) -> subprocess.CompletedProcess:
  """`python -m prog args...` from the repo root: CPU only, offline hub, XLA cache under tmp_path."""
  env = dict(
    os.environ,
    CODI_JAX_CACHE=str(tmp_path / "xla"),
    JAX_PLATFORMS="cpu",
    HF_HUB_OFFLINE="1",
    HF_HUB_CACHE=str(tmp_path / "hub"),
    **(extra_env or {}),
  )
  return subprocess.run(
    [sys.executable, "-m", prog, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def assert_usage_error(proc: subprocess.CompletedProcess, prog: str, *needles):
  """Exit 2 and exactly one stderr line `prog: error: ...` naming every needle; no traceback."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith(f"{prog}: error: "), lines[0]
  for n in needles:
    assert str(n) in lines[0], lines[0]


def raises_one_line(fn, *needles) -> str:
  """`fn()` raises an InputError whose message is one line naming every needle; returns it."""
  with pytest.raises(InputError) as info:
    fn()
  msg = str(info.value)
  assert "\n" not in msg, msg
  for n in needles:
    assert str(n) in msg, msg
  return msg
