"""Workdir ownership: one run per workdir, stale locks taken over, bad workdirs refused in one line."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time

import cli_util
import epath_test
import pytest

from codi_jax import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = """
import sys
from codi_jax.workdir import WorkdirLock
with WorkdirLock(sys.argv[1]):
  print("held", flush=True)
  sys.stdin.readline()
"""


@pytest.fixture
def holder(tmp_path):
  """A subprocess holding tmp_path/run until its stdin closes."""
  proc = subprocess.Popen(
    [sys.executable, "-c", HOLD, str(tmp_path / "run")],
    cwd=ROOT,
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline() == "held\n", proc.stderr.read()
  yield proc
  if proc.poll() is None:
    proc.kill()
  proc.wait()


def _lock(path) -> str:
  return os.path.join(path, wd.LOCK_NAME)


def _write_record(directory, **changes) -> wd.Holder:
  me = dataclasses.replace(wd._me(), **changes)  # pylint: disable=protected-access
  os.makedirs(directory, exist_ok=True)
  with open(_lock(directory), "w") as f:
    json.dump(dataclasses.asdict(me), f)
  return me


def test_second_run_is_refused_and_the_first_is_unaffected(tmp_path, holder):
  run = tmp_path / "run"
  before = open(_lock(run), "rb").read()
  record = json.loads(before)
  assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
  cli_util.raises_one_line(
    lambda: wd.WorkdirLock(str(run)).acquire(),
    "in use by another run",
    f"host {socket.gethostname()}",
    f"pid {holder.pid}",
    f"started at {record['started_at']}",
    _lock(run),
  )
  assert open(_lock(run), "rb").read() == before
  assert wd.read_holder(str(run)).pid == holder.pid
  out, err = holder.communicate("\n", timeout=30)  # the first run finishes normally
  assert holder.returncode == 0, err
  assert not os.path.exists(_lock(run))
  with wd.WorkdirLock(str(run)) as lock:  # and then the workdir is free
    assert lock.held and wd.read_holder(str(run)).pid == os.getpid()
  assert sorted(os.listdir(run)) == []


def test_holder_killed_leaves_a_lock_that_is_taken_over(tmp_path, holder, caplog):
  run = tmp_path / "run"
  holder.kill()
  holder.wait()
  assert os.path.exists(_lock(run))  # SIGKILL: no cleanup
  with caplog.at_level(logging.WARNING), wd.WorkdirLock(str(run)):
    assert wd.read_holder(str(run)).pid == os.getpid()
  assert f"pid {holder.pid} no longer exists" in caplog.text
  assert "taking over the stale lock" in caplog.text
  assert not os.path.exists(_lock(run))


def test_stale_lock_from_a_dead_pid(tmp_path, caplog, capsys):
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"],
    capture_output=True,
    text=True,
    check=True,
  )
  pid = int(dead.stdout)
  _write_record(tmp_path, pid=pid, proc_start=None)
  with caplog.at_level(logging.WARNING), wd.WorkdirLock(str(tmp_path)) as lock:
    assert lock.holder.pid == os.getpid()
  assert f"pid {pid} no longer exists" in caplog.text
  assert "warning: taking over the stale lock" in capsys.readouterr().out


def test_stale_lock_from_a_reused_pid(tmp_path, caplog):
  _write_record(tmp_path, pid=os.getppid(), proc_start=1)  # the pid lives, started at another time
  with caplog.at_level(logging.WARNING), wd.WorkdirLock(str(tmp_path)):
    pass
  assert "is now another process (pid reused)" in caplog.text


def test_stale_lock_from_before_a_reboot(tmp_path, caplog):
  _write_record(tmp_path, pid=os.getppid(), boot_id="another-boot")
  with caplog.at_level(logging.WARNING), wd.WorkdirLock(str(tmp_path)):
    pass
  assert "rebooted" in caplog.text


def test_lock_from_another_host_or_container_is_refused(tmp_path):
  for other in (dict(host="elsewhere.example"), dict(pid_ns="pid:[1]")):
    _write_record(tmp_path, pid=999_999_999, **other)
    before = open(_lock(tmp_path), "rb").read()
    cli_util.raises_one_line(lambda: wd.WorkdirLock(str(tmp_path)).acquire(), "pid 999999999")
    assert open(_lock(tmp_path), "rb").read() == before


def test_unreadable_lock_file(tmp_path, caplog):
  with open(_lock(tmp_path), "w") as f:
    f.write("{half a rec")
  os.utime(_lock(tmp_path), (time.time() - 60, time.time() - 60))
  with caplog.at_level(logging.WARNING), wd.WorkdirLock(str(tmp_path)):
    pass
  assert "no readable record" in caplog.text


def test_same_process_twice_is_refused(tmp_path):
  with wd.WorkdirLock(str(tmp_path)):
    cli_util.raises_one_line(
      lambda: wd.WorkdirLock(str(tmp_path)).acquire(), "in use by this process"
    )
  assert not os.path.exists(_lock(tmp_path))


def test_released_on_exception(tmp_path):
  with pytest.raises(ZeroDivisionError), wd.WorkdirLock(str(tmp_path)):
    assert os.path.exists(_lock(tmp_path))
    _ = 1 / 0
  assert not os.path.exists(_lock(tmp_path))


def test_release_leaves_a_replaced_lock_alone(tmp_path, caplog):
  lock = wd.WorkdirLock(str(tmp_path)).acquire()
  os.unlink(_lock(tmp_path))
  other = _write_record(tmp_path, pid=12345)
  with caplog.at_level(logging.WARNING):
    lock.release()
  assert wd.read_holder(str(tmp_path)) == other
  assert "removed or replaced" in caplog.text


def test_only_process_zero_takes_the_lock(tmp_path, holder):
  run = tmp_path / "run"
  with wd.WorkdirLock(str(run), process_index=1) as lock:
    assert not lock.held
  assert wd.read_holder(str(run)).pid == holder.pid


def test_creates_a_missing_workdir(tmp_path):
  run = tmp_path / "a" / "b"
  with wd.WorkdirLock(str(run)):
    assert os.path.isdir(run)


def test_a_refused_claim_removes_only_the_empty_directories_it_created(tmp_path, holder):
  """A block that raises: the workdir and parents created for it go while empty; what existed,
  or holds a file, stays. A claim refused for a lock held elsewhere touches nothing."""
  with pytest.raises(ValueError), wd.claim(str(tmp_path / "a" / "b" / "run")):
    raise ValueError("refused")
  assert sorted(os.listdir(tmp_path)) == ["run"]  # the holder's
  with pytest.raises(ValueError), wd.claim(str(tmp_path / "c" / "run")) as path:
    open(os.path.join(os.path.dirname(path), "note"), "w").close()  # noqa: SIM115
    raise ValueError("refused")
  assert os.listdir(tmp_path / "c") == ["note"]
  with wd.claim(str(tmp_path / "d" / "run")):
    pass
  assert os.path.isdir(tmp_path / "d" / "run")  # a claim that ended normally keeps its workdir
  before = sorted(os.listdir(tmp_path / "run"))
  cli_util.raises_one_line(lambda: wd.claim(str(tmp_path / "run")).__enter__(), "in use")
  assert sorted(os.listdir(tmp_path / "run")) == before
  assert wd.missing_dirs("gs://bucket/run") == []


@pytest.mark.parametrize(
  "path,needles",
  [
    ("/proc/forbidden", ("/proc/forbidden", "cannot create")),
    ("", ("empty path",)),
    ("nosuch://bucket/run", ("unsupported URL scheme nosuch://",)),
    ("a\0b", ("NUL",)),
  ],
)
def test_invalid_workdir(path, needles):
  cli_util.raises_one_line(
    lambda: wd.WorkdirLock(path, what="--workdir").acquire(), "--workdir", *needles
  )


gcs = epath_test.gcs  # gs:// through etils.epath on a local folder


def test_gs_workdir_takes_a_lock_object(gcs):
  """gs:// is a workdir (through etils.epath): a best-effort lock object, refused while held."""
  run = "gs://bucket/run"
  with wd.WorkdirLock(run, what="--workdir") as lock:
    assert wd.read_holder(run) == lock.holder and gcs.writes == [f"{run}/{wd.LOCK_NAME}"]
    cli_util.raises_one_line(lambda: wd.WorkdirLock(run).acquire(), "in use by this process", run)
  assert wd.read_holder(run) is None


def test_workdir_under_a_file_or_a_file(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  cli_util.raises_one_line(
    lambda: wd.WorkdirLock(str(f / "run")).acquire(), str(f), "cannot create"
  )
  cli_util.raises_one_line(lambda: wd.WorkdirLock(str(f)).acquire(), "not a directory")


def test_unwritable_workdir(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  os.chmod(ro, 0o500)
  try:
    if os.access(ro, os.W_OK):  # root: mode bits do not apply; use a read-only mount instead
      ro = "/proc/self"
    cli_util.raises_one_line(lambda: wd.WorkdirLock(str(ro)).acquire(), str(ro))
  finally:
    os.chmod(tmp_path / "ro", 0o700)


RACE = """
import sys
from codi_jax.errors import InputError
from codi_jax.workdir import WorkdirLock
try:
  lock = WorkdirLock(sys.argv[1]).acquire()
except InputError:
  print("refused", flush=True)
  sys.exit(0)
print("won", flush=True)
sys.stdin.readline()
lock.release()
"""


def _result(stdout) -> str:
  """The racer's outcome; the winner may first print the takeover warning."""
  line = stdout.readline()
  while line.startswith("warning:"):
    line = stdout.readline()
  return line.strip()


def test_racing_runs_on_a_stale_lock_one_wins(tmp_path):
  _write_record(tmp_path, pid=999_999_999)  # stale: every racer may take it over
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", RACE, str(tmp_path)],
      cwd=ROOT,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      text=True,
    )
    for _ in range(4)
  ]
  try:
    results = sorted(_result(p.stdout) for p in procs)
  finally:
    for p in procs:
      p.communicate("\n", timeout=30)
  assert results == ["refused"] * 3 + ["won"]
  assert not os.path.exists(_lock(tmp_path))
  assert sorted(os.listdir(tmp_path)) == []  # no temporary or guard files left behind


def test_filesystem_without_hard_links(tmp_path, monkeypatch):
  def no_link(src, dst):
    raise OSError(1, "Operation not permitted")

  monkeypatch.setattr(os, "link", no_link)
  with wd.WorkdirLock(str(tmp_path)) as lock:
    assert wd.read_holder(str(tmp_path)) == lock.holder
    cli_util.raises_one_line(
      lambda: wd.WorkdirLock(str(tmp_path)).acquire(), "in use by this process"
    )
  assert sorted(os.listdir(tmp_path)) == []


def test_disk_full_while_taking_the_lock(tmp_path, monkeypatch):
  def full(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  cli_util.raises_one_line(
    lambda: wd.WorkdirLock(str(tmp_path)).acquire(), "No space left on device"
  )
  assert sorted(os.listdir(tmp_path)) == []
