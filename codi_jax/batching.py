"""Fixed shapes for jitted programs: length buckets, left padding, and the one batched loop.

Every evaluation in the library (training-time validation, `codi_jax.evaluate`,
`soft_jax.evaluate`) runs through `fixed_batches`: items grouped by shape bucket, cut into batches of
exactly `batch_size` rows (the last one filled by repeating its own rows), so each bucket compiles
once and padding rows never reach the results.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import numpy as np

from codi_jax.errors import InputError

T = TypeVar("T")


def bucket_size(length: int, buckets: int | Sequence[int]) -> int:
  """`length` rounded up to a multiple of `buckets` (an int) or to the next listed size: nearby
  lengths share one compiled program."""
  if isinstance(buckets, int):
    if buckets <= 0:
      raise InputError(f"bucket multiple must be positive, got {buckets}")
    return -(-length // buckets) * buckets
  fits = [b for b in sorted(buckets) if b >= length]
  if not fits:
    raise InputError(f"length {length} exceeds the largest bucket {max(buckets)}")
  return fits[0]


def left_pad(
  seqs: Sequence[Sequence[int]], pad_id: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
  """[B, length] ids and mask with every sequence right-aligned."""
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"sequence of {len(s)} tokens exceeds the bucket of {length}")
    if s:
      ids[i, length - len(s) :] = s
      mask[i, length - len(s) :] = True
  return ids, mask


def fixed_batches(
  items: Sequence[T],
  batch_size: int,
  run: Callable[[list[T]], Sequence[Any]],
  *,
  bucket: Callable[[T], Hashable] | None = None,
  progress: str | None = None,
) -> list[Any]:
  """`run(batch)` over fixed-size batches of `items`; one result per item, in input order.

  Items with the same `bucket(item)` (default: all the same) are batched together; a short last
  batch is filled with copies of its own rows, whose results are dropped. `progress` names a tqdm
  bar on stderr (None: no bar).
  """
  if batch_size < 1:
    raise InputError(f"batch size must be >= 1, got {batch_size}")
  groups: dict[Hashable, list[int]] = {}
  for i, item in enumerate(items):
    groups.setdefault(None if bucket is None else bucket(item), []).append(i)
  bar = None
  if progress is not None:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    bar = tqdm(
      total=len(items), desc=progress, unit="ex", file=sys.stderr, dynamic_ncols=True, leave=False
    )
  results: list[Any] = [None] * len(items)
  for key in sorted(groups, key=lambda k: (k is not None, k)):
    idx = groups[key]
    for start in range(0, len(idx), batch_size):
      chunk = idx[start : start + batch_size]
      rows = [chunk[j % len(chunk)] for j in range(batch_size)]
      out = run([items[r] for r in rows])
      for j, r in enumerate(chunk):
        results[r] = out[j]
      if bar is not None:
        bar.update(len(chunk))
  if bar is not None:
    bar.close()
  return results
