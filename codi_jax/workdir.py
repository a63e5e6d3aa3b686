"""One run per workdir: `<workdir>/.lock`, created atomically and naming its holder.

(Over 400 lines: local and object-store locks share the holder record and the staleness rules.)

    with WorkdirLock(workdir, process_index=jax.process_index()):
      ...  # the whole run

A second run on the same workdir is refused with an InputError naming the holder (host, pid, start
time). A lock left by a run that died (SIGKILL, OOM, reboot) is taken over with a warning when that
can be proven from this machine: same host and pid namespace, and the holder's pid is gone, belongs
to a newer process (pid reuse: its start time differs), or the host has rebooted since.

Why a lock *file* (published with link(2), or O_CREAT|O_EXCL where hard links are unsupported) and
not flock(2): flock is not shared across machines on many network filesystems (NFSv3 without lockd,
gcsfuse, some FUSE mounts), where it silently lets two runs in; link and O_EXCL are atomic on local
filesystems and on NFSv3+ (link on every NFS version), and the file's JSON tells people who holds
it. The cost is that a dead holder leaves the file behind, hence the stale-lock checks above. A lock
held from *another* machine can never be proven stale from here: it is refused, and the message
says to remove the file if no run is using the workdir. On filesystems where neither link nor
O_EXCL is atomic (NFSv2), two runs starting within milliseconds may both succeed.

Object stores (`gs://bucket/run`, or another URL `etils.epath` serves): epath offers no atomic
create-if-absent (no link, no O_EXCL, no generation precondition), so the lock is a best-effort lock
*object*, `<workdir>/.lock` holding the same JSON record: read it; if it names a live holder, refuse
(as above: one left by a dead run on this host is taken over, one from another machine refused);
otherwise write our record, wait `_SETTLE_S` seconds, read it back, and hold the lock only if it
still carries our random token (else judge the record that replaced it). GCS and S3 read their own
writes, so of two runs starting at once the later writer wins and the other is refused, unless a
write takes longer than the settle time. Release deletes the object only while it still holds our
token (read, then delete: not atomic either). A job killed without its `finally` (SIGKILL, a lost
VM) leaves the object behind, and a new VM is another host: delete it (`gcloud storage rm
gs://.../.lock`) once no run uses the workdir.

Multi-process JAX jobs: pass `process_index=jax.process_index()`. Only process 0 takes the lock
(every process of the job shares the workdir, so locking from each would refuse the job's own
processes); on the others the lock does nothing. If process 0 is refused it raises while the others
go on, so the caller must make the outcome collective (take the lock before anything else and stop
every process when process 0 fails, e.g. by broadcasting its result).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import os
import socket
import time
import uuid

from absl import logging
from etils import epath

from codi_jax import files
from codi_jax.errors import InputError

LOCK_NAME = ".lock"
_UNREADABLE_GRACE_S = 5.0  # a lock file without a JSON record younger than this is being written
_GUARD_TIMEOUT_S = 30.0  # a takeover holds its guard for milliseconds; older guards are leftovers
_ATTEMPTS = 100
_SETTLE_S = 2.0  # object stores: how long a racing run's write may take to land


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a workdir: the JSON record in its lock file."""

  host: str
  pid: int
  started_at: str  # ISO-8601 UTC, for people
  boot_id: str = ""  # Linux boot id: a reboot ends every holder on the host
  pid_ns: str = ""  # pid namespace: pids are only comparable within one
  proc_start: int | None = None  # the pid's start time (clock ticks after boot): tells pid reuse
  token: str = ""  # random; release removes the lock only while it still holds this

  def describe(self) -> str:
    return f"host {self.host}, pid {self.pid}, started at {self.started_at}"

  @classmethod
  def parse(cls, raw: bytes) -> Holder | None:
    """The record in a lock file, or None if it is not one (empty, partly written, garbage)."""
    try:
      d = json.loads(raw)
      return cls(
        host=str(d["host"]),
        pid=int(d["pid"]),
        started_at=str(d["started_at"]),
        boot_id=str(d.get("boot_id", "")),
        pid_ns=str(d.get("pid_ns", "")),
        proc_start=None if d.get("proc_start") is None else int(d["proc_start"]),
        token=str(d.get("token", "")),
      )
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
      return None


def check_workdir(workdir: str, what: str = "--workdir") -> str:
  """The absolute path of `workdir` (or its normalized URL: gs://bucket/run), created if missing; a
  one-line InputError unless it is a writable local directory or a usable object-store URL."""
  if not isinstance(workdir, str | os.PathLike) or not os.fspath(workdir):
    raise InputError(f"{what}: empty path; give a local directory")
  workdir = os.fspath(workdir)
  if "\0" in workdir:
    raise InputError(f"{what}: {workdir!r}: a path cannot contain NUL characters")
  if files.is_url(workdir):
    return str(_check_url(workdir, what))
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f"{what}: {workdir}: exists and is not a directory")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise InputError(f"{what}: {workdir}: cannot create the directory ({_reason(e)})") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise InputError(f"{what}: {workdir}: the directory is not writable")
  return path


def _check_url(workdir: str, what: str) -> epath.Path:
  """An object-store workdir through etils.epath, created if missing (whether it is writable shows
  at the first write: the lock's)."""
  try:
    path = epath.Path(workdir)
  except KeyError:  # epath knows no such scheme
    raise InputError(
      f"{what}: {workdir!r}: unsupported URL scheme {workdir.split('://')[0]}://; give a local "
      "directory or an object store etils.epath supports (gs://, s3://)"
    ) from None
  try:
    if path.exists() and not path.is_dir():
      raise InputError(f"{what}: {workdir}: exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
  except InputError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (missing client library, credentials, ...)
    raise InputError(f"{what}: {workdir}: cannot create the directory ({_describe(e)})") from None
  return path


def read_holder(workdir: str) -> Holder | None:
  """The holder recorded in `<workdir>/.lock`, or None if there is no readable lock."""
  try:
    raw = _read(os.path.join(workdir, LOCK_NAME))
  except Exception:  # pylint: disable=broad-except  (object stores raise more than OSError)
    return None
  return None if raw is None else Holder.parse(raw)


class WorkdirLock:
  """Exclusive ownership of a workdir for one run; a context manager (or acquire()/release())."""

  def __init__(self, workdir: str, *, process_index: int = 0, what: str = "--workdir"):
    self.workdir = workdir
    self.process_index = int(process_index)
    self.what = what
    self.path = ""  # the lock file, once acquired
    self.holder: Holder | None = None  # our record while held

  @property
  def held(self) -> bool:
    return self.holder is not None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> WorkdirLock:
    """Takes the lock, or raises InputError naming the live holder; a no-op off process 0."""
    if self.held:
      raise RuntimeError(f"{self.path} is already held by this WorkdirLock")
    if self.process_index != 0:
      return self
    directory = check_workdir(self.workdir, self.what)
    lock = os.path.join(directory, LOCK_NAME)
    me = _me()
    record = json.dumps(dataclasses.asdict(me), indent=1).encode() + b"\n"
    if files.is_url(directory):
      return self._acquire_object(lock, me, record)
    for _ in range(_ATTEMPTS):
      if self._publish(lock, record):
        self.path, self.holder = lock, me
        return self
      try:
        raw = _read(lock)
      except OSError as e:  # never judged stale: unreadable is not provably dead
        raise InputError(
          f"{self.what}: {self.workdir}: cannot read {lock} ({_reason(e)})"
        ) from None
      if raw is None:
        continue  # released meanwhile: try again
      holder = Holder.parse(raw)
      if holder is None:
        age = _age(lock)
        if age is not None and age < _UNREADABLE_GRACE_S:
          time.sleep(0.05)  # being written right now (the O_EXCL fallback is not atomic)
          continue
        reason = "its lock file holds no readable record"
      else:
        reason = _stale_reason(holder, me)
        if reason is None:
          raise self._in_use(lock, holder, me)
      self._take_over(lock, raw, holder, reason)
    raise InputError(
      f"{self.what}: {self.workdir}: could not take {lock} ({_ATTEMPTS} tries; other runs kept "
      "creating and removing it)"
    )

  def _in_use(self, lock: str, holder: Holder, me: Holder) -> InputError:
    mine = (holder.host, holder.pid, holder.pid_ns) == (me.host, me.pid, me.pid_ns)
    return InputError(
      f"{self.what}: {self.workdir} is in use by {'this process' if mine else 'another run'}"
      f" ({holder.describe()}); wait for it to finish, or remove {lock} if no run is using "
      "this directory"
    )

  def _acquire_object(self, lock: str, me: Holder, record: bytes) -> WorkdirLock:
    """The best-effort lock object of an object store (module docstring): read, write, settle,
    read back."""
    for _ in range(_ATTEMPTS):
      raw = self._object_io(lock, "read", lambda: _read(lock))
      if raw is not None:
        holder = Holder.parse(raw)  # an object is written whole: unreadable is not in progress
        reason = (
          "its lock holds no readable record" if holder is None else _stale_reason(holder, me)
        )
        if reason is None:
          raise self._in_use(lock, holder, me)
        _warn_takeover(lock, holder, reason)
      self._object_io(lock, "create", lambda: epath.Path(lock).write_bytes(record))
      time.sleep(_SETTLE_S)  # a run that raced us (it also saw no live lock) has written by now
      now = Holder.parse(self._object_io(lock, "read", lambda: _read(lock)) or b"")
      if now is not None and now.token == me.token:
        self.path, self.holder = lock, me
        return self
    raise InputError(
      f"{self.what}: {self.workdir}: could not take {lock} ({_ATTEMPTS} tries; other runs kept "
      "replacing it)"
    )

  def _object_io(self, lock: str, verb: str, fn):
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except  (any client error: one line)
      raise InputError(
        f"{self.what}: {self.workdir}: cannot {verb} {lock} ({_describe(e)})"
      ) from None

  def release(self) -> None:
    """Removes the lock if this object (and process) still holds it; never raises."""
    if not self.held:
      return
    holder, self.holder = self.holder, None
    if holder.pid != os.getpid():
      return  # a forked child: the parent owns the lock
    try:
      raw = _read(self.path)
    except Exception:  # pylint: disable=broad-except  (object stores raise more than OSError)
      raw = None
    current = None if raw is None else Holder.parse(raw)
    if current is None or current.token != holder.token:
      logging.warning(
        "%s was removed or replaced while this run held it (now: %s)",
        self.path,
        "none" if current is None else current.describe(),
      )
      return
    if files.is_url(self.path):
      try:
        epath.Path(self.path).unlink(missing_ok=True)
      except Exception as e:  # pylint: disable=broad-except  (release never raises)
        logging.warning("could not remove %s (%s); remove it by hand", self.path, _describe(e))
      return
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self.path)

  def _publish(self, lock: str, record: bytes) -> bool:
    """Creates `lock` holding `record` atomically; False if it exists."""
    tmp = f"{lock}.{uuid.uuid4().hex}.tmp"
    try:
      with open(tmp, "xb") as f:
        f.write(record)
        f.flush()
        os.fsync(f.fileno())
      try:
        os.link(tmp, lock)  # readers never see a partly written record
        return True
      except FileExistsError:
        return os.stat(tmp).st_nlink == 2  # NFS: a retried link whose first try succeeded
      except OSError as e:
        if e.errno not in (
          errno.EPERM,
          errno.ENOTSUP,
          errno.EOPNOTSUPP,
          errno.EMLINK,
          errno.ENOSYS,
        ):
          raise
      try:  # no hard links on this filesystem (e.g. gcsfuse): O_EXCL, then write
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "wb") as f:
        f.write(record)
        f.flush()
        os.fsync(f.fileno())
      return True
    except OSError as e:
      raise InputError(
        f"{self.what}: {self.workdir}: cannot create {lock} ({_reason(e)})"
      ) from None
    finally:
      with contextlib.suppress(OSError):
        os.unlink(tmp)

  def _take_over(self, lock: str, raw: bytes, holder: Holder | None, reason: str) -> None:
    """Removes a stale lock, if it is still the one judged stale; the caller then retries.

    Takeovers go through `<lock>.takeover` (O_EXCL), so two runs finding the same stale lock
    cannot both remove it (the second would remove the first one's fresh lock).
    """
    guard = lock + ".takeover"
    try:
      os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
      age = _age(guard)
      if age is not None and age > _GUARD_TIMEOUT_S:
        with contextlib.suppress(OSError):
          os.unlink(guard)
      time.sleep(0.05)
      return
    except OSError as e:
      raise InputError(
        f"{self.what}: {self.workdir}: cannot create {guard} ({_reason(e)})"
      ) from None
    try:
      try:
        if _read(lock) != raw:
          return  # changed meanwhile: judge again
      except OSError:
        return  # the caller's next read reports it
      _warn_takeover(lock, holder, reason)
      with contextlib.suppress(FileNotFoundError):
        os.unlink(lock)
    finally:
      with contextlib.suppress(OSError):
        os.unlink(guard)


def _warn_takeover(lock: str, holder: Holder | None, reason: str) -> None:
  who = holder.describe() if holder else "unknown holder"
  logging.warning("taking over the stale lock %s (%s): %s", lock, who, reason)
  print(f"warning: taking over the stale lock {lock} ({who}): {reason}", flush=True)


# ------------------------------------------------------------------------------------- process ids


def _me() -> Holder:
  pid = os.getpid()
  return Holder(
    host=socket.gethostname(),
    pid=pid,
    started_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    boot_id=_boot_id(),
    pid_ns=_pid_ns(),
    proc_start=_proc_start(pid),
    token=uuid.uuid4().hex,
  )


def _stale_reason(holder: Holder, me: Holder) -> str | None:
  """Why `holder` is provably gone, or None if it may still be running."""
  if holder.host != me.host or holder.pid_ns != me.pid_ns:
    return None  # another machine or container: its pids mean nothing here
  if holder.boot_id and me.boot_id and holder.boot_id != me.boot_id:
    return "the host has rebooted since"
  if holder.pid <= 0 or not _pid_exists(holder.pid):
    return f"pid {holder.pid} no longer exists"
  start = _proc_start(holder.pid)
  if holder.proc_start is not None and start is not None and start != holder.proc_start:
    return f"pid {holder.pid} is now another process (pid reused)"
  return None


def _pid_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's process
  except OverflowError:
    return False
  try:  # a zombie has exited: it holds nothing
    with open(f"/proc/{pid}/stat", "rb") as f:
      return _stat_fields(f.read())[0] != b"Z"
  except OSError:
    return True


def _stat_fields(stat: bytes) -> list[bytes]:
  """/proc/<pid>/stat from field 3 (state) on; the command name may hold spaces and ')'."""
  return stat[stat.rindex(b")") + 2 :].split()


def _proc_start(pid: int) -> int | None:
  """Field 22 of /proc/<pid>/stat (start time in clock ticks after boot); None off Linux."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      return int(_stat_fields(f.read())[19])
  except (OSError, ValueError, IndexError):
    return None


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _pid_ns() -> str:
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return ""


# ----------------------------------------------------------------------------------------- files


def _read(path: str) -> bytes | None:
  """The first 64 KiB of `path` (a file, or an object: gs://...), None if it does not exist; other
  errors propagate."""
  try:
    if files.is_url(path):
      obj = epath.Path(path)
      return obj.read_bytes()[: 1 << 16] if obj.exists() else None
    with open(path, "rb") as f:
      return f.read(1 << 16)
  except FileNotFoundError:
    return None


def _age(path: str) -> float | None:
  try:
    return time.time() - os.stat(path).st_mtime
  except OSError:
    return None


def _reason(e: OSError) -> str:
  return e.strerror or str(e)


def _describe(e: Exception) -> str:
  """One line for any client error (object stores raise more than OSError)."""
  first = (str(e).strip().splitlines() or [""])[0][:200]
  return f"{type(e).__name__}: {first}" if first else type(e).__name__


def missing_dirs(path) -> list[str]:
  """The local directories `path` names that do not exist yet, deepest first (what creating it
  would create); [] for an object-store URL."""
  if files.is_url(path):
    return []
  out, p = [], os.path.abspath(os.path.expanduser(os.fspath(path)))
  while not os.path.lexists(p) and os.path.dirname(p) != p:
    out.append(p)
    p = os.path.dirname(p)
  return out


def remove_empty(dirs) -> None:
  """Removes each local directory of `dirs` (deepest first) while it is empty: what a refused
  start created, and nothing anyone else put there since; never raises."""
  for d in dirs:
    if files.is_url(d):
      return
    try:
      os.rmdir(d)
    except OSError:  # not empty (someone wrote there), already gone, or not ours to remove
      return


@contextlib.contextmanager
def claim(workdir: str):
  """The whole job's claim on `workdir`: process 0 takes the lock, every process learns whether it
  did (a collective), and all of them stop with an InputError if not. Yields the absolute path.

  If the block raises (a refused start), the directories created for the workdir are removed
  again as long as they are empty (`remove_empty`): a refused start leaves nothing behind."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  main = jax.process_index() == 0
  created = missing_dirs(workdir) if main else []
  try:
    path = check_workdir(workdir)
  except InputError:
    remove_empty(created)  # makedirs may have created parents before it failed
    raise
  lock = WorkdirLock(path, process_index=jax.process_index())
  error = None
  try:
    lock.acquire()
  except InputError as e:
    error = e
  if jax.process_count() > 1:
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not ok and error is None:
      error = InputError(f"--workdir: {workdir}: process 0 could not take the lock (see its log)")
  if error is not None:
    remove_empty(created)
    raise error
  done = False
  try:
    yield path
    done = True
  finally:
    lock.release()
    if not done:
      remove_empty(created)
