"""Metric writing: TensorBoard (tensorboardX) plus a JSONL file, process 0 only."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

JSONL = "metrics.jsonl"


def truncate(workdir: str, step: int):
  """Drops records past `step` from `<workdir>/metrics.jsonl` (process 0; a resumed run rewrites them)."""
  path = os.path.join(workdir, JSONL)
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


class MetricWriter:
  """write_scalars(step, dict) to `<workdir>/metrics.jsonl` and TensorBoard; no-op off process 0."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, JSONL), "a", encoding="utf-8")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:
        self._tb = None

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
    self._jsonl.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **flat}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in flat.items():
        self._tb.add_scalar(k, v, step)

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
