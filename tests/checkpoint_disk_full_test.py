"""A full disk while checkpointing: one InputError naming the directory, the previous checkpoint
intact and restorable, the half-written step never taken for a checkpoint on the next start."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import sys
import time
import types

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from orbax.checkpoint._src.serialization import limits

from codi_jax import checkpoint
from codi_jax.errors import InputError

# Orbax leaves the failed save's pending write coroutines to a closed event loop: noise, not a bug here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What TensorStore raises when a write hits ENOSPC (its format for any OS error; see the EFBIG test).
TS_ENOSPC = (
  'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file "{d}": Failed '
  "to write 4000 bytes to file 7: No space left on device [os_error_code='28']"
)


def _state(v: int) -> dict:
  k = jax.random.key(v)
  return {
    "params": {"w": jax.random.normal(k, (1000,)), "b": jax.random.normal(k, (7, 3), jnp.bfloat16)},
    "step": np.int32(v),
  }


def _abstract() -> dict:
  return {
    "params": {
      "w": jax.ShapeDtypeStruct((1000,), jnp.float32),
      "b": jax.ShapeDtypeStruct((7, 3), jnp.bfloat16),
    },
    "step": np.zeros((), np.int32),
  }


def _iter():
  return iter(grain.MapDataset.source(list(range(100))).to_iter_dataset())


def _meta(step: int) -> dict:
  return {"process_count": jax.process_count(), "step": step}


def _first_checkpoint(directory, async_save):
  ck = checkpoint.Checkpoints(str(directory), save_every=1, keep=1, async_save=async_save)
  it = _iter()
  for _ in range(3):
    next(it)
  ck.save(1, _state(1), it, _meta(1))
  ck.wait()
  for _ in range(5):
    next(it)
  return ck, it


def _settle(directory, quiet_s=0.5, timeout_s=30.0):
  """Waits until nothing under `directory` changes for `quiet_s`: TensorStore writes the failed
  save had already issued finish in the background (a real rerun is a new process)."""

  def snapshot():
    out = []
    for root, _, files in os.walk(directory):
      for f in files:
        with contextlib.suppress(OSError):
          st = os.stat(os.path.join(root, f))
          out.append((root, f, st.st_size, st.st_mtime_ns))
    return sorted(out)

  deadline, last, since = time.time() + timeout_s, None, time.time()
  while time.time() < deadline:
    now = snapshot()
    if now != last:
      last, since = now, time.time()
    elif time.time() - since >= quiet_s:
      return
    time.sleep(0.05)


def _assert_resumes_from_the_first(directory):
  """A fresh start: the failed step is not listed, step 1 restores exactly (arrays and data
  position), and the rerun's own save of step 2 replaces the leftover temporary directory."""
  _settle(directory)
  ck = checkpoint.Checkpoints(str(directory), save_every=1, keep=1)
  try:
    assert ck.steps() == [1]
    it = _iter()
    step, state, meta = ck.restore(_abstract(), it)
    assert step == 1 and meta["step"] == 1 and meta["data_restored"]
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(1))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert next(it) == 3
    ck.save(2, _state(2), it, _meta(2))
    ck.wait()
    assert ck.steps() == [2]
  finally:
    ck.close()
  assert sorted(os.listdir(directory)) == ["2"]


def _assert_one_line(info, directory, step=2):
  msg = str(info.value)
  assert "\n" not in msg, msg
  assert msg.startswith(f"{directory}: no space left on device while writing checkpoint {step}")
  assert "checkpoint 1 is intact" in msg, msg
  return msg


@contextlib.asynccontextmanager
async def _no_space(after: int, calls: list, real):
  """limits.reserved_bytes, which guards every TensorStore array write: the first `after` writes
  go through, then the disk is full."""
  calls.append(1)
  if len(calls) > after:
    raise ValueError(TS_ENOSPC)
  async with real as r:
    yield r


@pytest.mark.parametrize("async_save", [True, False])
def test_tensorstore_write_hits_enospc_mid_save(tmp_path, monkeypatch, async_save):
  ck, it = _first_checkpoint(tmp_path, async_save)
  calls, real = [], limits.reserved_bytes
  monkeypatch.setattr(limits, "reserved_bytes", lambda lim, n: _no_space(1, calls, real(lim, n)))
  with pytest.raises(InputError) as info:
    ck.save(2, _state(2), it, _meta(2))
    ck.wait()
  assert len(calls) >= 2  # one array was written before the disk filled up
  _assert_one_line(info, tmp_path)
  monkeypatch.undo()
  ck.close()
  assert [d for d in os.listdir(tmp_path) if d.startswith("2")] == ["2.orbax-checkpoint-tmp"]
  _assert_resumes_from_the_first(tmp_path)


def test_async_failure_surfaces_at_the_next_save(tmp_path, monkeypatch):
  ck, it = _first_checkpoint(tmp_path, True)
  calls, real = [], limits.reserved_bytes
  monkeypatch.setattr(limits, "reserved_bytes", lambda lim, n: _no_space(0, calls, real(lim, n)))
  ck.save(2, _state(2), it, _meta(2))  # returns at once; the write fails in the background
  deadline = time.time() + 60
  while not calls and time.time() < deadline:
    time.sleep(0.01)
  monkeypatch.undo()
  with pytest.raises(InputError) as info:
    ck.save(3, _state(3), it, _meta(3))
  _assert_one_line(info, tmp_path, step=2)
  ck.close()
  _assert_resumes_from_the_first(tmp_path)


def test_python_file_write_hits_enospc(tmp_path, monkeypatch):
  """The JSON items (meta, data iterator) are written from Python: an OSError(ENOSPC) there."""
  ck, it = _first_checkpoint(tmp_path, True)
  cls = type(epath.Path(tmp_path))
  real = cls.write_text

  def write_text(self, *args, **kw):
    if "2.orbax-checkpoint-tmp" in str(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return real(self, *args, **kw)

  monkeypatch.setattr(cls, "write_text", write_text)
  with pytest.raises(InputError) as info:
    ck.save(2, _state(2), it, _meta(2))
    ck.wait()
  _assert_one_line(info, tmp_path)
  monkeypatch.undo()
  ck.close()
  _assert_resumes_from_the_first(tmp_path)


def test_other_failures_are_not_reworded(tmp_path, monkeypatch):
  ck, it = _first_checkpoint(tmp_path, False)

  @contextlib.asynccontextmanager
  async def broken(lim, n):
    raise ValueError("INTERNAL: something else")
    yield  # pylint: disable=unreachable

  monkeypatch.setattr(limits, "reserved_bytes", broken)
  with pytest.raises(ValueError, match="something else"):
    ck.save(2, _state(2), it, _meta(2))
  monkeypatch.undo()
  ck.close()
  _assert_resumes_from_the_first(tmp_path)


REAL_LIMIT = """
import resource, signal, sys
from absl import flags
flags.FLAGS.mark_as_parsed()
import checkpoint_disk_full_test as t
from codi_jax.errors import InputError
ck, it = t._first_checkpoint(sys.argv[1], True)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
try:
  ck.save(2, t._state(2), it, t._meta(2))
  ck.wait()
except InputError as e:
  print("refused:", e)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
ck.close()
"""


def test_real_tensorstore_write_failure_from_a_file_size_limit(tmp_path):
  """No root needed: RLIMIT_FSIZE makes the real TensorStore writes fail (EFBIG, not ENOSPC, but
  the same path through the OS error and its message)."""
  r = subprocess.run(
    [sys.executable, "-c", REAL_LIMIT, str(tmp_path)],
    cwd=os.path.join(ROOT, "tests"),
    env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT},
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  refused = [x for x in r.stdout.splitlines() if x.startswith("refused:")]
  assert refused, r.stdout[-2000:] + r.stderr[-2000:]
  assert f"{tmp_path}: file too large" in refused[0] and "checkpoint 1 is intact" in refused[0]
  _assert_resumes_from_the_first(tmp_path)


# As the CLIs run it (absl's log handler, `exit_on_input_error`), with 60 arrays: each pending write
# of the failed save used to print a traceback, and Orbax one per save thread.
MANY_ARRAYS_CLI = """
import resource, signal, sys
import grain, jax, numpy as np
from absl import app
from codi_jax import checkpoint, runtime
from codi_jax.errors import exit_on_input_error

def main(argv):
  runtime.setup_cli()
  ck = checkpoint.Checkpoints(argv[1], save_every=1, keep=1)
  it = iter(grain.MapDataset.source(list(range(100))).to_iter_dataset())
  state = {"params": {f"w{i}": jax.numpy.full((3000,), float(i)) for i in range(60)}}
  ck.save(1, state, it, {"process_count": 1})
  ck.wait()
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
  with exit_on_input_error("prog"):
    try:
      ck.save(2, state, it, {"process_count": 1})
      ck.wait()
    finally:
      resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
      ck.close()

app.run(main)
"""


def test_a_full_disk_is_the_only_line_on_stderr(tmp_path):
  """Orbax's error logs of the failed save and the tracebacks of its abandoned writes (`Event loop
  is closed`, one per array) are filtered out: the one line is all of stderr."""
  r = subprocess.run(
    [sys.executable, "-c", MANY_ARRAYS_CLI, str(tmp_path)],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "CODI_JAX_CACHE": "", "PYTHONPATH": ROOT},
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert r.returncode == 2, r.stderr[-3000:]
  assert r.stderr.splitlines() == [
    f"prog: error: {tmp_path}: file too large for the filesystem or the file-size limit while "
    "writing checkpoint 2; checkpoint 1 is intact. Free space, then rerun the same command to "
    "resume"
  ], r.stderr[-3000:]


def test_other_orbax_errors_and_unraisables_still_show(tmp_path):
  """The filters drop only a storage-full save's Orbax logs and `Event loop is closed` raised in
  asyncio; anything else still reaches the log and the previous unraisable hook."""
  checkpoint.Checkpoints(str(tmp_path), save_every=1).close()  # installs them
  assert sys.unraisablehook.func is checkpoint._hide_abandoned_writes
  seen = []
  for text, where in (
    ("Event loop is closed", os.path.join("asyncio", "base_events.py")),
    ("Event loop is closed", "ours.py"),
    ("other", os.path.join("asyncio", "base_events.py")),
  ):
    try:
      exec(compile("raise RuntimeError(text)", where, "exec"), {"text": text})  # noqa: S102
    except RuntimeError as e:
      args = types.SimpleNamespace(exc_value=e, exc_traceback=e.__traceback__)
      checkpoint._hide_abandoned_writes(args, previous=seen.append)
  assert [str(u.exc_value) for u in seen] == ["Event loop is closed", "other"]  # not asyncio's
  orbax_file = os.path.join(os.path.dirname(checkpoint.ocp.__file__), "x.py")
  full = OSError(errno.ENOSPC, "No space left on device")
  for path, exc, kept in (
    (orbax_file, full, False),
    (orbax_file, ValueError("INTERNAL"), True),
    (__file__, full, True),
  ):
    record = logging.LogRecord("absl", logging.ERROR, path, 1, "failed", (), (None, exc, None))
    assert checkpoint._drop_storage_full_logs(record) is kept


@pytest.mark.parametrize(
  "err,expected",
  [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
    (ValueError(TS_ENOSPC.format(d="/x")), "no space left on device"),
    (ValueError("Failed writing: [os_error_code='28']"), "no space left on device"),
    (ExceptionGroup("save", [ValueError("a"), OSError(errno.ENOSPC, "x")]), "no space left"),
    (OSError(errno.ENOENT, "No such file or directory"), None),
    (ValueError("INTERNAL: something else"), None),
  ],
)
def test_storage_full(err, expected):
  got = checkpoint.storage_full(err)
  assert got == expected or (expected and got.startswith(expected))


def test_storage_full_follows_causes():
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as inner:
      raise RuntimeError("commit failed") from inner
  except RuntimeError as outer:
    assert checkpoint.storage_full(outer) == "no space left on device"
