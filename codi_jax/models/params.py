"""Partitioning parameters into trainable and frozen trees (LoRA + chosen extras vs the base)."""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx


def trainable_filter(extra: Sequence[str] = (), lora: bool = True) -> nnx.filterlib.Filter:
  """LoRA parameters (if lora) plus every parameter under a path element named in `extra`."""
  parts = ([nnx.LoRAParam] if lora else []) + [nnx.PathContains(name) for name in extra]
  if not parts:
    raise ValueError("nothing would train: lora=False and no extra parameters named")
  return nnx.Any(*parts)


def split_trainable(model: nnx.Module, extra: Sequence[str] = (), lora: bool = True):
  """(graphdef, trainable, frozen): differentiate `trainable`, pass `frozen` through untouched.

  Rebuild with `nnx.merge(graphdef, trainable, frozen)` inside the jitted step.
  """
  return nnx.split(model, trainable_filter(extra, lora), ...)
