"""Metric writing: TensorBoard (tensorboardX) plus a JSONL file, process 0 only.

The workdir may be local or on an object store (gs://...; `files.as_path`). Objects cannot be
appended to and GCS takes at most about one write per second to one object, so there the JSONL
lines are kept in memory and the whole object is rewritten at most every `_FLUSH_S` seconds and on
close (a crash loses those seconds; a resumed run writes them again). TensorBoard events go to a
gs:// or s3:// workdir through tensorboardX's own writers (they need google-cloud-storage or
boto3; without them only metrics.jsonl is written, with a warning).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import logging

from codi_jax import files

JSONL = "metrics.jsonl"
_FLUSH_S = 30.0  # object stores: the longest a line waits before metrics.jsonl is rewritten
_TB_URLS = ("gs://", "s3://")  # URLs tensorboardX writes to itself


def truncate(workdir, step: int):
  """Drops records past `step` from `<workdir>/metrics.jsonl` (process 0; a resumed run rewrites them)."""
  path = files.as_path(workdir) / JSONL
  if jax.process_index() != 0 or not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)
  keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
  files.write_atomic(path, "".join(keep))


class MetricWriter:
  """write_scalars(step, dict) to `<workdir>/metrics.jsonl` and TensorBoard; no-op off process 0."""

  def __init__(self, workdir, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    self._lines: list[str] | None = None  # object stores: the whole file, rewritten on flush
    if not self.active:
      return
    root = files.as_path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    self._path = root / JSONL
    if files.is_url(root):
      self._lines = [self._path.read_text()] if self._path.exists() else []
      self._written = len(self._lines)
      self._flushed = time.monotonic()
    else:
      self._jsonl = self._path.open("a")
    if tensorboard and (not files.is_url(root) or str(root).startswith(_TB_URLS)):
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

        self._tb = SummaryWriter(str(root / "tb"))
      except ImportError as e:
        self._tb = None
        if files.is_url(root):
          logging.warning("%s: no TensorBoard events (%s); metrics.jsonl has every value", root, e)

  def write_scalars(self, step: int, scalars: dict):
    if not self.active:
      return
    flat = {}
    for k, v in scalars.items():
      a = np.asarray(v)
      if a.ndim == 0:
        flat[k] = float(a)
      else:  # vectors (e.g. per-layer distillation terms) become k/0, k/1, ...
        flat.update({f"{k}/{i}": float(x) for i, x in enumerate(a.reshape(-1))})
    line = json.dumps({"step": int(step), "time": round(time.time(), 3), **flat}) + "\n"
    if self._lines is not None:
      self._lines.append(line)
      if time.monotonic() - self._flushed >= _FLUSH_S:
        self._flush()
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in flat.items():
        self._tb.add_scalar(k, v, step)

  def _flush(self):
    """Object stores: rewrites metrics.jsonl whole (one write: never half a file)."""
    if len(self._lines) != self._written:
      self._path.write_text("".join(self._lines))
      self._written = len(self._lines)
    self._flushed = time.monotonic()

  def close(self):
    if self._lines is not None:
      self._flush()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
