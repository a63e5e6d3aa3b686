"""Fixed shapes for jitted programs: length buckets, left padding, and the one batched loop.

Every evaluation in the library (training-time validation, `codi_jax.evaluate`,
`soft_jax.evaluate`) runs through `fixed_batches`: items grouped by shape bucket, cut into batches of
exactly `batch_size` rows (the last one filled by repeating its own rows), so each bucket compiles
once and padding rows never reach the results. A resumed evaluation passes the results it already
has (`done`) and gets each new batch's results as it finishes (`on_batch`, to record them).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from codi_jax.errors import InputError

T = TypeVar("T")


def bucket_size(length: int, buckets: int | Sequence[int], max_padding: float = 0.0) -> int:
  """`length` rounded up to a multiple of `buckets` (an int) or to the next listed size: nearby
  lengths share one compiled program.

  max_padding > 0 (int `buckets` only) sizes the multiple by the length: the largest power of two
  <= max_padding * length, within [1, buckets], so a short segment pads by less than that fraction
  of itself (a 7-token decoder stays 7, not 32) and a long one still shares buckets.
  """
  if isinstance(buckets, int):
    if buckets <= 0:
      raise InputError(f"bucket multiple must be positive, got {buckets}")
    if max_padding < 0:
      raise InputError(f"max_padding must be >= 0, got {max_padding}")
    if max_padding > 0:
      buckets = min(buckets, 1 << max(0, int(max_padding * length).bit_length() - 1))
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
  done: Mapping[int, Any] | None = None,
  on_batch: Callable[[list[int], list[Any]], None] | None = None,
) -> list[Any]:
  """`run(batch)` over fixed-size batches of `items`; one result per item, in input order.

  Items with the same `bucket(item)` (default: all the same) are batched together; a short last
  batch is filled with copies of its own rows, whose results are dropped. `done` maps item
  positions to results computed before (a resumed evaluation): a batch whose items are all done is
  not run and keeps them, so batches are the same as in an uninterrupted run. `on_batch(positions,
  results)` follows each batch that ran. `progress` names a tqdm bar on stderr (None: no bar).
  """
  if batch_size < 1:
    raise InputError(f"batch size must be >= 1, got {batch_size}")
  done = done or {}
  groups: dict[Hashable, list[int]] = {}
  for i, item in enumerate(items):
    groups.setdefault(None if bucket is None else bucket(item), []).append(i)
  chunks = []
  for key in sorted(groups, key=lambda k: (k is not None, k)):
    idx = groups[key]
    chunks += [idx[start : start + batch_size] for start in range(0, len(idx), batch_size)]
  results: list[Any] = [None] * len(items)
  todo = []
  for chunk in chunks:
    if all(r in done for r in chunk):
      for r in chunk:
        results[r] = done[r]
    else:
      todo.append(chunk)
  bar = None
  if progress is not None:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    bar = tqdm(
      total=len(items), initial=len(items) - sum(map(len, todo)), desc=progress, unit="ex",
      file=sys.stderr, dynamic_ncols=True, leave=False,
    )  # fmt: skip
  try:
    for chunk in todo:
      rows = [chunk[j % len(chunk)] for j in range(batch_size)]
      out = run([items[r] for r in rows])
      for j, r in enumerate(chunk):
        results[r] = out[j]
      if on_batch is not None:
        on_batch(chunk, [results[r] for r in chunk])
      if bar is not None:
        bar.update(len(chunk))
  finally:
    if bar is not None:
      bar.close()
  return results
