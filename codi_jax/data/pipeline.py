"""CODI's training input pipeline on grain: fixed-shape numpy batches, resumable mid-epoch.

Shapes: every example is padded to the bucketed maximum lengths of the whole dataset, computed once
from all records before the per-process slice, so every batch of a run on every process has one
shape and training compiles once. Each segment (question, teacher, decoder, teacher window) is
bucketed on its own, its multiple sized by its length (`MAX_PADDING`, `batching.bucket_size`).
Records are tokenized up front (that pass reports long examples, checks each distillation index and
finds the maxima); the grain `map` only pads.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
from absl import logging

from codi_jax.data import codi_batches
from codi_jax.data.codi_batches import CodiExamples, Shapes
from codi_jax.errors import InputError
from codi_jax.models.tokenizer import Tokenizer

# Default `bucket_size` max_padding of the training shapes: each segment pads by under 1/8 of its
# longest length (a 7-token decoder stays 7; 65 -> 72, 94 -> 96 at `buckets`=32), where one
# multiple of 32 for every segment turned 65/94/7 into 96/96/32 and cost 20-43% of a CPU step.
MAX_PADDING = 0.125


@dataclasses.dataclass(frozen=True)
class TrainData:
  """A batched dataset with what built it: the examples, their shapes and tokenization report."""

  dataset: grain.IterDataset
  examples: CodiExamples
  shapes: Shapes
  report: dict
  steps_per_epoch: int


class _ProcessRows(grain.MapDataset):
  """This process's rows of every global batch: local element i is global element
  (i // local) * global_ + first + i % local, so the union over processes of local batch t is
  exactly global batch t, in the same row order (process 0's rows first)."""

  def __init__(self, parent: grain.MapDataset, *, first: int, local: int, global_: int):
    super().__init__(parent)
    self._first, self._local, self._global = first, local, global_

  def __len__(self) -> int:
    return len(self._parent) // self._global * self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    q, r = divmod(index, self._local)
    return self._parent[q * self._global + self._first + r]


def codi_dataset(
  examples: CodiExamples,
  shapes: Shapes,
  *,
  batch_size: int,
  seed: int = 0,
  num_epochs: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  prefetch: int = 8,
  worker_count: int = 0,
) -> grain.IterDataset:
  """This process's share of shuffled, repeated global batches of `batch_size` padded examples.

  One global order (shuffled with `seed`, reshuffled every epoch) serves every process count:
  each of the `process_count` processes yields `batch_size // process_count` rows of each global
  batch, and the union of the local batches of step t is global batch t of a 1-process run, so a
  run's data does not depend on how many hosts feed it. `num_epochs=None` repeats forever; batches
  may straddle epochs; the last partial batch is dropped. `prefetch` batches are prepared ahead by
  as many threads (grain's default, 500, holds far too many CODI batches); `worker_count` > 0 adds
  that many worker processes.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if batch_size % count:
    raise InputError(
      f"batch_size={batch_size} is not a multiple of the {count} processes feeding it"
    )
  if len(examples) < batch_size:
    raise InputError(f"{len(examples)} examples is fewer than batch_size={batch_size}")
  local = batch_size // count
  ds = grain.MapDataset.source(examples).shuffle(seed).repeat(num_epochs)
  if count > 1:
    ds = _ProcessRows(ds, first=index * local, local=local, global_=batch_size)
  ds = ds.map(functools.partial(codi_batches.pad_example, shapes=shapes, ids=examples.ids))
  ds = ds.batch(local, drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return ds


def train_data(
  records: Sequence[Mapping[str, Any]],
  tokenizer: Tokenizer,
  *,
  pad_id: int,
  bot_id: int,
  eot_id: int,
  batch_size: int,
  seed: int = 0,
  buckets: int | Sequence[int] = 32,
  max_padding: float = MAX_PADDING,
  shapes: Shapes | None = None,
  num_epochs: int | None = None,
  prefetch: int = 8,
  worker_count: int = 0,
  **tokenize_kwargs: Any,
) -> TrainData:
  """Clean records -> tokenized, checked examples -> `examples_data`.

  `tokenize_kwargs` go to `tokenize_records` (distill_offset, max_piece_tokens, max_token_num,
  strip_piece_bos, ...).
  """
  examples, report = codi_batches.tokenize_records(
    records, tokenizer, pad_id=pad_id, bot_id=bot_id, eot_id=eot_id, **tokenize_kwargs
  )
  return examples_data(
    examples,
    report,
    batch_size=batch_size,
    seed=seed,
    buckets=buckets,
    max_padding=max_padding,
    shapes=shapes,
    num_epochs=num_epochs,
    prefetch=prefetch,
    worker_count=worker_count,
  )


def examples_data(
  examples: CodiExamples,
  report: dict,
  *,
  batch_size: int,
  seed: int = 0,
  buckets: int | Sequence[int] = 32,
  max_padding: float = MAX_PADDING,
  shapes: Shapes | None = None,
  num_epochs: int | None = None,
  prefetch: int = 8,
  worker_count: int = 0,
) -> TrainData:
  """Tokenized examples -> shapes (`fit_shapes`, checked) -> `codi_dataset`, as `TrainData`.

  `shapes` overrides the fitted ones (e.g. to share them with another run).
  """
  if shapes is None:
    shapes = codi_batches.fit_shapes(examples, buckets, max_padding)
  codi_batches.check_fits(examples, shapes)
  count = jax.process_count()
  ds = codi_dataset(
    examples,
    shapes,
    batch_size=batch_size,
    seed=seed,
    num_epochs=num_epochs,
    process_count=count,
    prefetch=prefetch,
    worker_count=worker_count,
  )
  steps = len(examples) // batch_size
  logging.info("CODI data: %d examples, shapes %s, %d steps/epoch.", len(examples), shapes, steps)
  return TrainData(ds, examples, shapes, report, steps)
