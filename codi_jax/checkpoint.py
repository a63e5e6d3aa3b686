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
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

from codi_jax.errors import InputError


class Checkpoints:
  """save(step, state, data_iter, metrics) / restore(abstract_state, data_iter) over one directory."""

  def __init__(
    self,
    directory: str,
    *,
    save_every: int,
    keep: int = 2,
    best_metric: str = "",
    best_mode: str = "max",
    async_save: bool = True,
  ):
    self.directory = os.path.abspath(directory)
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
    self._mngr = ocp.CheckpointManager(self.directory, options=self._options)

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
    return self._mngr.save(step, args=args, metrics=metrics, force=True)

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()

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

  def restore(self, abstract_state: Any, data_iter, *, restore_data: bool = True):
    """(step, state, meta) of the newest readable checkpoint, or None if there is none.

    abstract_state: ShapeDtypeStructs with the *current* shardings (the mesh may differ from the
    one that saved). Unreadable checkpoints are moved aside with a warning; if none is readable,
    InputError (never a silent fresh start). With restore_data=False
    the iterator is left alone (the caller repositions it, e.g. after a process-count change).
    """
    tried = []
    for step in reversed(self.steps()):
      tried.append(step)
      try:
        meta = self._meta(step)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if restore_data and meta.get("process_count") == jax.process_count():
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
    path = os.path.join(self.directory, str(step))
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
    if jax.process_index() == 0 and os.path.exists(path):
      dest = os.path.join(self.directory + ".corrupt", str(step))
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      if os.path.exists(dest):
        shutil.rmtree(dest)
      shutil.move(path, dest)
    multihost_utils.sync_global_devices(f"codi_jax:set_aside:{step}")  # every process sees it gone
    self._mngr.close()
    self._mngr = ocp.CheckpointManager(self.directory, options=self._options)  # forget the step


def _check_finite(state: dict, step: int):
  """A checkpoint is only written after a finite loss; a non-finite parameter means corruption."""
  leaves = [
    x for x in jax.tree.leaves(state.get("params", {})) if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  if leaves and not bool(
    jax.jit(lambda xs: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in xs])))(leaves)
  ):
    raise ValueError(f"step {step}: non-finite parameters")
