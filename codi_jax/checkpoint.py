"""Training checkpoints on an Orbax CheckpointManager: one layout, async saves, exact resume.

Every checkpoint is `Composite(state=..., data=..., meta=...)` from the first save on:
- state: {"params": trainable parameters, "opt": optimizer state, "step": [], "rng": key data};
- data: the Grain iterator of this process (its position in the global data order);
- meta: JSON with the config, the process count and the step (what wrote it).
Saves are asynchronous (the arrays are copied off the devices before `save` returns, so the next
step may donate them). Orbax writes into a temporary directory and renames it when complete, so
a half-written checkpoint is never listed; one that is listed but unreadable (e.g. truncated by
hand or by a failing disk) is moved to `<dir>.corrupt/` with a warning and the previous one is
restored. Retention: the last `keep` checkpoints plus the best one by a validation metric.
A full disk (or quota, or file-size limit) while writing ends in one InputError naming the
directory, and nothing else on stderr (Orbax's logs of that save and the tracebacks of its abandoned
writes are filtered out: `_quiet_storage_full_noise`); the failed step stays a temporary directory (removed on the next start), so the newest
complete checkpoint is what a rerun resumes from. The directory may be local or on an object store
(gs://...): Orbax, and every access here, goes through `etils.epath`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import signal
import sys
import threading
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

from codi_jax import files
from codi_jax.config_rules import Bool, Enum, Int, Str
from codi_jax.errors import InputError
from codi_jax.options import option


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
  """`config.checkpoint`: when to save, how many to keep, which is best, background saves."""

  every_steps: int = option(Int(0, doc="steps between checkpoints; 0 = only at evaluations"))
  keep: int = option(Int(1, doc="newest checkpoints kept"))
  best_metric: str = option(Str(doc="auto | '' | valid/<mode>_acc | valid/<mode>_tokens"))
  best_mode: str = option(Enum(("max", "min"), doc="best = largest or smallest"))
  async_save: bool = option(Bool(doc="save in the background"))


class Checkpoints:
  """save(step, state, data_iter, metrics) / restore(abstract_state, data_iter) over one directory."""

  def __init__(
    self,
    directory,
    *,
    save_every: int,
    keep: int = 2,
    best_metric: str = "",
    best_mode: str = "max",
    async_save: bool = True,
  ):
    self.directory = files.as_path(directory)  # local (made absolute) or gs://...
    self.save_every = int(save_every)
    self.best_metric = best_metric
    policies = [ocm.LatestN(n=max(1, keep))]
    if best_metric:
      if best_mode not in ("max", "min"):
        raise InputError(f"--config.checkpoint.best_mode: {best_mode!r} (max | min)")
      policies.append(
        ocm.BestN(
          get_metric_fn=lambda m: m[best_metric],
          reverse=best_mode == "min",
          n=1,
          keep_checkpoints_without_metrics=False,
        )
      )
    self._options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(1, self.save_every),
      enable_async_checkpointing=async_save,
      preservation_policy=ocm.AnyPreservationPolicy(policies),
      cleanup_tmp_directories=True,
      create=True,
    )
    _quiet_storage_full_noise()
    self._mngr = ocp.CheckpointManager(self.directory, options=self._options)
    self._in_flight: int | None = None  # the step of the last save started
    self._reported: int | None = None  # the step whose full-storage failure was raised

  # --------------------------------------------------------------------------------------- saving

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(
    self, step: int, state: dict, data_iter, meta: dict, metrics: dict | None = None
  ) -> bool:
    """Starts an async save of `step` (forced: the caller decides when); False if it exists."""
    if step in self._mngr.all_steps():
      return False
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter),
      meta=ocp.args.JsonSave(meta),
    )
    self.wait()  # Orbax's save waits for the previous one too; here its failure names its step
    self._in_flight = step
    with self._writing(step):
      return self._mngr.save(step, args=args, metrics=metrics, force=True)

  def wait(self):
    with self._writing(self._in_flight):
      self._mngr.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      with self._writing(self._in_flight):  # an async checkpointer re-raises a failed save here
        self._mngr.close()

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    """Turns a full-storage failure of a save (async ones surface later) into one InputError."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      full = storage_full(e)
      if full is None:
        raise
      if step == self._reported:
        return  # Orbax raises a failed save again on wait and close: report it once
      self._reported = step
      # From the disk: after a failed save Orbax's own list has already dropped what the save
      # would have retired (and no longer lists anything), though nothing was deleted.
      names = []
      with contextlib.suppress(OSError):
        names = [p.name for p in self.directory.iterdir()]
      done = sorted(int(n) for n in names if n.isdigit() and int(n) != step)
      kept = f"checkpoint {done[-1]} is intact" if done else "no checkpoint was complete yet"
      raise InputError(
        f"{self.directory}: {full} while writing checkpoint {step}; {kept}. Free space, then "
        "rerun the same command to resume"
      ) from None

  # ------------------------------------------------------------------------------------- restoring

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def _meta(self, step: int) -> dict:
    return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def newest_meta(self) -> dict:
    """The meta item of the newest checkpoint whose meta is readable ({} if none)."""
    for step in reversed(self.steps()):
      try:
        return self._meta(step)
      except Exception:  # pylint: disable=broad-except  (restore() then sets it aside)
        continue
    return {}

  def restore(self, abstract_state: Any, data_iter):
    """(step, state, meta) of the newest readable checkpoint, or None if there is none.

    abstract_state: ShapeDtypeStructs with the *current* shardings (the mesh may differ from the
    one that saved). Unreadable checkpoints are moved aside with a warning; if none is readable,
    InputError (never a silent fresh start). The iterator is restored only when the process
    count is the one that saved (meta["data_restored"]); otherwise the caller repositions it.
    """
    tried = []
    for step in reversed(self.steps()):
      tried.append(step)
      try:
        meta = self._meta(step)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if meta.get("process_count") == jax.process_count():
          items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        _check_finite(restored["state"], step)
      except (FloatingPointError, InputError):
        raise
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      meta["data_restored"] = "data" in items
      return step, restored["state"], meta
    if tried:
      raise InputError(
        f"{self.directory}: none of the checkpoints {tried} could be restored (moved to "
        f"{self.directory}.corrupt/); start over with --config.overwrite=True or a new --workdir"
      )
    return None

  def _set_aside(self, step: int, err: Exception):
    path = self.directory / str(step)
    first = (str(err).strip().splitlines() or [""])[0][:200]
    logging.warning(
      "checkpoint %s is unreadable (%s: %s); moving it to %s.corrupt/ and trying the previous one",
      path,
      type(err).__name__,
      first,
      self.directory,
    )
    print(
      f"warning: checkpoint {path} is unreadable ({type(err).__name__}); using the previous one",
      flush=True,
    )
    if jax.process_index() == 0 and path.exists():
      dest = self.directory.parent / f"{self.directory.name}.corrupt" / str(step)
      dest.parent.mkdir(parents=True, exist_ok=True)
      if dest.exists():
        dest.rmtree()
      path.rename(dest)
    multihost_utils.sync_global_devices(f"codi_jax:set_aside:{step}")  # every process sees it gone
    self._mngr.close()
    self._mngr = ocp.CheckpointManager(self.directory, options=self._options)  # forget the step


_STORAGE_FULL = {
  errno.ENOSPC: "no space left on device",
  errno.EDQUOT: "disk quota exceeded",
  errno.EFBIG: "file too large for the filesystem or the file-size limit",
}


def storage_full(err: BaseException) -> str | None:
  """What ran out ("no space left on device", ...) if `err` or one of its causes is a write that
  failed for lack of storage: an OSError from Python, or TensorStore's [os_error_code='28'] text."""
  stack, seen = [err], set()
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _STORAGE_FULL:
      return _STORAGE_FULL[e.errno]
    text = str(e)
    for code, what in _STORAGE_FULL.items():
      if f"os_error_code='{code}'" in text or os.strerror(code) in text:
        return what
    stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  return None


def _drop_storage_full_logs(record) -> bool:
  """A logging filter: False for Orbax's error logs of a save that ran out of storage (one with a
  traceback per save thread); `Checkpoints._writing` reports that save in one line."""
  exc = record.exc_info[1] if record.exc_info else None
  return not (f"{os.sep}orbax{os.sep}" in record.pathname and storage_full(exc))


def _hide_abandoned_writes(unraisable, previous):
  """An unraisable `Event loop is closed` from asyncio: a TensorStore write of a save Orbax gave up
  on (after a failed write, e.g. a full disk) finishing after its event loop closed. One traceback
  per pending write, saying nothing beyond the failure itself; everything else goes to `previous`."""
  err, tb = unraisable.exc_value, unraisable.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  if (
    isinstance(err, RuntimeError)
    and str(err) == "Event loop is closed"
    and tb is not None
    and tb.tb_frame.f_code.co_filename.endswith(os.path.join("asyncio", "base_events.py"))
  ):
    return
  previous(unraisable)


def _quiet_storage_full_noise():
  """Installs the two filters above once per process, so that a full disk during a save ends in the
  one line of `Checkpoints._writing`, not a traceback per array and thread."""
  absl_logger = logging.get_absl_logger()
  if _drop_storage_full_logs not in absl_logger.filters:
    absl_logger.addFilter(_drop_storage_full_logs)
  hook = sys.unraisablehook
  if getattr(hook, "func", None) is not _hide_abandoned_writes:
    sys.unraisablehook = functools.partial(_hide_abandoned_writes, previous=hook)


def _check_finite(state: dict, step: int):
  """A checkpoint is only written after a finite loss; a non-finite parameter means corruption."""
  leaves = [
    x for x in jax.tree.leaves(state.get("params", {})) if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  if leaves and not bool(
    jax.jit(lambda xs: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in xs])))(leaves)
  ):
    raise ValueError(f"step {step}: non-finite parameters")


# Config keys a resumed run may change; everything else must match the checkpoint's config.
_RESUMABLE_CHANGES = (
  "mesh",
  "logical_axis_rules",
  "checkpoint",
  "eval",
  "log_every",
  "workdir",
  "resume",
  "overwrite",
)


def key_data(key) -> np.ndarray:
  """A PRNG key as plain data (what a checkpoint stores)."""
  return np.asarray(jax.random.key_data(key))


def check_resumable(saved: dict, config, where: str):
  """Refuses to resume a checkpoint written with another config (mesh, eval, ... may change)."""
  now = json.loads(config.to_json_best_effort())
  diff = sorted(
    k for k in set(saved) | set(now) if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k)
  )
  if diff:
    raise InputError(
      f"{where}: written with a different config ({', '.join(diff)} differ); resume with the "
      "same settings, or start over with --config.overwrite=True or a new --workdir"
    )


class Interrupted(KeyboardInterrupt):
  """A signal ended the run early: `message` is the one line to print, `code` the exit status
  (130 SIGINT, 143 SIGTERM). `abandoned`: a compile still runs in a worker thread (it cannot be
  cancelled), so the process must end with os._exit rather than wait for it at exit."""

  def __init__(self, message: str, code: int, abandoned: bool = False):
    super().__init__(message)
    self.message, self.code, self.abandoned = message, code, abandoned


class Preemption:
  """SIGTERM (preemption) or SIGINT (Ctrl-C) -> stop at the next step boundary (all processes agree
  on which) and checkpoint; `wait` keeps a compile interruptible. After the first signal both
  take their default action again, so a second one ends the process at once, saving nothing.

  Multi-process runs leave SIGTERM to jax's preemption service and SIGINT to Python (a
  KeyboardInterrupt, no checkpoint): one process cannot decide alone where all of them stop.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None  # the first signal received
    self._multi = jax.process_count() > 1
    self._old = {}
    if not self._multi:
      try:
        self._old = {s: signal.signal(s, self._on_signal) for s in self._SIGNALS}
      except ValueError:  # not the main thread: no handler, as multi-process
        self._old = {}

  def _on_signal(self, signum, frame):
    del frame
    if self.signum is None:
      self.signum = signum
    for s in self._SIGNALS:
      signal.signal(s, signal.SIG_DFL)

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signum is not None

  def wait(self, fn, what: str):
    """fn() run in a worker thread while this thread waits for it, so that a signal ends the wait
    at once: Interrupted (abandoned=True; fn goes on until the process ends). Python runs signal
    handlers only in the main thread between bytecodes, so an XLA compile called from the main
    thread would hold a signal off until it returns (SmolLM2 unrolled: 20+ minutes on a CPU)."""
    result = {}

    def target():
      try:
        result["value"] = fn()
      except BaseException as e:  # pylint: disable=broad-except  (re-raised in the caller)
        result["error"] = e

    worker = threading.Thread(target=target, name=f"codi_jax: {what}", daemon=True)
    started = self.signum is None  # else a signal came before (e.g. while lowering): no compile
    if started:
      worker.start()
    while started and worker.is_alive() and self.signum is None:
      worker.join(0.1)  # a KeyboardInterrupt (multi-process Ctrl-C) interrupts this wait too
    if not started or worker.is_alive():
      name = signal.Signals(self.signum).name
      raise Interrupted(f"{name} while {what}", 128 + self.signum, abandoned=started)
    if "error" in result:
      raise result["error"]
    return result["value"]

  def close(self):
    for s, old in self._old.items():
      signal.signal(s, old)
