"""batching.fixed_batches: fixed shapes, input order, and a resumed run that skips the batches it
already has and reports each new one."""

import pytest

from codi_jax.batching import fixed_batches
from codi_jax.errors import InputError


def _run(calls):
  def run(batch):
    calls.append(list(batch))
    return [x * 10 for x in batch]

  return run


def test_fixed_shape_batches_by_bucket_in_input_order():
  calls = []
  out = fixed_batches([1, 22, 3, 24, 5], 2, _run(calls), bucket=lambda x: x > 9)
  assert out == [10, 220, 30, 240, 50]
  assert calls == [[1, 3], [5, 5], [22, 24]]  # the short batch repeats its own rows
  with pytest.raises(InputError, match="batch size must be >= 1"):
    fixed_batches([1], 0, _run([]))


def test_resume_runs_only_unfinished_batches_and_reports_each():
  items = list(range(10))
  whole = fixed_batches(items, 4, _run([]))
  calls, reported = [], []
  done = {i: whole[i] for i in (0, 1, 2, 3, 4)}  # batch 0 whole, batch 1 only in part (torn)
  out = fixed_batches(
    items, 4, _run(calls), done=done, on_batch=lambda pos, res: reported.append((pos, res))
  )
  assert out == whole
  assert calls == [[4, 5, 6, 7], [8, 9, 8, 9]]  # the same batches as the uninterrupted run
  assert reported == [([4, 5, 6, 7], [40, 50, 60, 70]), ([8, 9], [80, 90])]  # no padding rows
