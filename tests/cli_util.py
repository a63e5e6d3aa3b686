"""The one-line errors users see: a `python -m` entry point run in a subprocess and its usage
errors, or an InputError raised in process."""

import os
import shutil
import signal
import subprocess
import sys

import pytest

from codi_jax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_tool(name: str) -> str | None:
  """The program `name` beside this interpreter (a venv's bin/, not always on PATH), else on PATH."""
  return shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)


def worker_cache() -> str | None:
  """This xdist worker's XLA cache folder for the session (conftest sets the root), else None."""
  cache = os.environ.get("CODI_JAX_TEST_CACHE_ROOT")
  return os.path.join(cache, os.environ.get("PYTEST_XDIST_WORKER", "main")) if cache else None


def _env(tmp_path, extra_env=None) -> dict:
  """CPU only, offline hub, the session's XLA cache for this worker (conftest), else tmp_path's."""
  cache = worker_cache()
  return dict(
    os.environ,
    CODI_JAX_CACHE=cache or str(tmp_path / "xla"),
    JAX_PLATFORMS="cpu",
    HF_HUB_OFFLINE="1",
    HF_HUB_CACHE=str(tmp_path / "hub"),
    **(extra_env or {}),
  )


# Each of $2.. (count $1) bind-mounted read-only over itself, then the command: run under
# `unshare -m`, the mounts exist only in that private mount namespace.
_RO_MOUNTS = (
  'n=$1; shift; while [ "$n" -gt 0 ]; do mount --bind -o ro "$1" "$1" || exit 97; shift; '
  'n=$((n - 1)); done; exec "$@"'
)


def run_module(
  prog: str, tmp_path, *args, timeout=600, extra_env=None, read_only=()
) -> subprocess.CompletedProcess:
  """`python -m prog args...` from the repo root: CPU only, offline hub, the session's XLA cache.

  `read_only`: directories the program finds read-only: mode bits, or for root (whom they do not
  stop) a read-only bind mount in a private mount namespace (`unshare -m`; skips without one).
  """
  cmd = [sys.executable, "-m", prog, *args]
  read_only = [str(d) for d in read_only]
  modes = {d: os.stat(d).st_mode for d in read_only}
  root = bool(read_only) and os.geteuid() == 0
  if root:
    unshare = find_tool("unshare")
    if not unshare:
      pytest.skip("read-only directory as root: needs unshare(1)")
    cmd = [unshare, "-m", "sh", "-c", _RO_MOUNTS, "sh", str(len(read_only)), *read_only, *cmd]
  try:
    for d in read_only if not root else ():
      os.chmod(d, 0o555)
    proc = subprocess.run(
      cmd,
      cwd=REPO,
      env=_env(tmp_path, extra_env),
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
    )
  finally:
    for d, mode in modes.items():
      os.chmod(d, mode)
  if root and (proc.returncode == 97 or proc.stderr.startswith("unshare:")):
    pytest.skip(f"read-only directory as root: no private read-only mount ({proc.stderr[:200]})")
  return proc


# Runs `python -m <prog> <args>` with <target> ("module:attr.path") wrapped so that the process
# stops itself (SIGSTOP) each time the target returns.
_STOP_AFTER = """
import importlib, os, runpy, signal, sys
module, _, attr = sys.argv[1].partition(":")
owner = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
  owner = getattr(owner, part)
original = getattr(owner, name)

def stop_after(*args, **kwargs):
  out = original(*args, **kwargs)
  os.kill(os.getpid(), signal.SIGSTOP)  # the test kills or interrupts the process here
  return out

setattr(owner, name, stop_after)
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


class Stopped:
  """A CLI process stopped (SIGSTOP) right after `target` first returned (`stop_after`)."""

  def __init__(self, proc, logs):
    self.proc, self.logs = proc, logs

  def kill(self) -> subprocess.CompletedProcess:
    """SIGKILL: no handler, no `finally` runs."""
    self.proc.kill()
    return self._wait()

  def interrupt(self) -> subprocess.CompletedProcess:
    """Ctrl-C: SIGINT, then SIGCONT so the process handles it where it stopped."""
    self.proc.send_signal(signal.SIGINT)
    self.proc.send_signal(signal.SIGCONT)
    return self._wait()

  def _wait(self) -> subprocess.CompletedProcess:
    code = self.proc.wait(timeout=600)
    out, err = (p.read_text() for p in self.logs)
    return subprocess.CompletedProcess(self.proc.args, code, out, err)


def _sigint_as_in_a_terminal():
  """In the child before exec: SIGINT at its default, as a shell in a terminal starts a program.
  pytest-xdist workers ignore SIGINT, an ignored signal stays ignored across exec, and Python
  then never raises KeyboardInterrupt: a Ctrl-C test would test nothing."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_after(prog: str, tmp_path, target: str, *args, extra_env=None) -> Stopped:
  """`python -m prog args...` (as `run_module`), stopped by SIGSTOP right after `target`
  ("module:attr.path", e.g. "codi_jax.results:Journal._write") first returns: a deterministic
  point at which to kill or interrupt it for real. Fails if the program ends first."""
  logs = (tmp_path / f"{prog}.{target}.stdout", tmp_path / f"{prog}.{target}.stderr")
  with open(logs[0], "w") as out, open(logs[1], "w") as err:
    proc = subprocess.Popen(
      [sys.executable, "-c", _STOP_AFTER, target, prog, *args],
      cwd=REPO,
      env=_env(tmp_path, extra_env),
      stdout=out,
      stderr=err,
      preexec_fn=_sigint_as_in_a_terminal,
    )
  _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once it stops (or ends)
  if not os.WIFSTOPPED(status):
    proc.returncode = os.waitstatus_to_exitcode(status)
    raise AssertionError(f"{prog} ended before {target} returned:\n{logs[1].read_text()[-3000:]}")
  return Stopped(proc, logs)


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
