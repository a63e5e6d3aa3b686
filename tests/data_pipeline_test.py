"""The grain pipeline: one batch shape for the whole run, epochs, per-process shares, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.data import codi_batches, pipeline, readers, synthetic
from codi_jax.errors import InputError
from codi_jax.models import tokenizer_bpe

V = 50257
IDS = dict(pad_id=V, bot_id=V + 1, eot_id=V + 2)
N, B = 70, 8


@pytest.fixture(scope="module")
def data():
  records, _ = readers.prepare_train_records(synthetic.generate("train", N, seed=0))
  return pipeline.train_data(records, tokenizer_bpe.gpt2_default(), batch_size=B, seed=1, **IDS)


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_fixed_shapes_across_epochs(data):
  assert data.steps_per_epoch == N // B
  s = data.shapes
  expected = {
    "encoder_ids": (B, s.question),
    "encoder_mask": (B, s.question),
    "teacher_ids": (B, s.teacher),
    "teacher_labels": (B, s.teacher),
    "teacher_mask": (B, s.teacher),
    "teacher_distill_index": (B,),
    "teacher_label_pos": (B, s.teacher_span),
    "decoder_ids": (B, s.decoder),
    "decoder_labels": (B, s.decoder),
    "decoder_mask": (B, s.decoder),
    "decoder_distill_index": (B,),
    "index": (B,),
  }
  colon = data.examples[0]["answer"][3]  # The ":" of "The answer is:".
  for batch in _take(iter(data.dataset), 3 * data.steps_per_epoch):
    assert {k: v.shape for k, v in batch.items()} == expected
    assert batch["teacher_ids"].dtype == np.int32 and batch["teacher_mask"].dtype == bool
    for key in ("teacher", "decoder"):
      index = batch[f"{key}_distill_index"][:, None]
      assert (np.take_along_axis(batch[f"{key}_ids"], index, 1) == colon).all()


def test_per_segment_shapes_and_one_compile_per_run(data):
  """The default rule pads each segment by under MAX_PADDING of its longest example (the decoder
  not at all), and every batch of every epoch has one shape: a jitted step traces once."""
  lengths = data.examples.lengths()
  for key in ("question", "teacher", "decoder", "teacher_span"):
    longest, size = int(lengths[key].max()), getattr(data.shapes, key)
    assert longest <= size < longest + max(1, pipeline.MAX_PADDING * longest)
  assert data.shapes.decoder == int(lengths["decoder"].max())
  traces = []

  @jax.jit
  def step(batch):
    traces.append(1)  # trace-time only: counts compiles
    return sum(jnp.sum(v.astype(jnp.float32)) for v in batch.values())

  for batch in _take(iter(data.dataset), 2 * data.steps_per_epoch + 1):  # past two epoch ends
    step(batch)
  assert len(traces) == 1
  records, _ = readers.prepare_train_records(synthetic.generate("train", 16, seed=0))
  old = pipeline.train_data(
    records, tokenizer_bpe.gpt2_default(), batch_size=4, max_padding=0, **IDS
  )
  assert all(getattr(old.shapes, k) % 32 == 0 for k in ("question", "teacher", "decoder"))


def test_epoch_covers_each_example_once(data):
  one_epoch = pipeline.codi_dataset(data.examples, data.shapes, batch_size=B, seed=1, num_epochs=1)
  seen = np.concatenate([b["index"] for b in one_epoch])
  assert len(seen) == N // B * B and len(set(seen.tolist())) == len(seen)
  two = pipeline.codi_dataset(data.examples, data.shapes, batch_size=10, seed=1, num_epochs=2)
  batches = [b["index"].tolist() for b in two]
  assert len(batches) == 14 and sorted(sum(batches[:7], [])) == list(range(N))
  assert batches[:7] != batches[7:]  # Reshuffled each epoch.


def test_process_shares(data):
  def batches(**kw):
    ds = pipeline.codi_dataset(data.examples, data.shapes, batch_size=15, num_epochs=1, **kw)
    return [b["index"].tolist() for b in ds]

  single = batches()
  shares = [batches(process_index=i, process_count=3) for i in range(3)]
  assert [len(s) for s in shares] == [4, 4, 4] and len(single) == 4  # 70 // 15 global batches.
  assert all(len(b) == 5 for s in shares for b in s)
  for t, whole in enumerate(single):  # Local batches of step t, in process order, = global batch t.
    assert shares[0][t] + shares[1][t] + shares[2][t] == whole
  with pytest.raises(InputError, match="not a multiple"):
    pipeline.codi_dataset(data.examples, data.shapes, batch_size=16, process_count=3)
  with pytest.raises(InputError, match="fewer than batch_size"):
    pipeline.codi_dataset(data.examples, data.shapes, batch_size=80, process_count=2)


def test_shapes_override(data):
  records, _ = readers.prepare_train_records(synthetic.generate("train", 16, seed=0))
  tok = tokenizer_bpe.gpt2_default()
  wide = pipeline.train_data(records, tok, batch_size=4, shapes=data.shapes, prefetch=0, **IDS)
  assert next(iter(wide.dataset))["teacher_ids"].shape == (4, data.shapes.teacher)
  small = codi_batches.Shapes(question=8, teacher=8, decoder=8)
  with pytest.raises(InputError, match="do not fit"):
    pipeline.train_data(records, tok, batch_size=4, shapes=small, **IDS)


def test_iterator_resume(data):
  it = iter(data.dataset)
  _take(it, 11)  # Past the first epoch boundary.
  state = it.get_state()
  expected = _take(it, 4)
  restored = iter(data.dataset)
  restored.set_state(state)
  for a, b in zip(expected, _take(restored, 4)):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_workers_see_every_example(data):
  ds = pipeline.codi_dataset(
    data.examples, data.shapes, batch_size=B, seed=1, num_epochs=1, worker_count=2
  )
  it = iter(ds)
  try:
    seen = sorted(np.concatenate([b["index"] for b in it]).tolist())
  finally:
    it.close()  # Stops the worker processes now, not at interpreter exit.
  serial = pipeline.codi_dataset(data.examples, data.shapes, batch_size=B, seed=1, num_epochs=1)
  assert seen == sorted(np.concatenate([b["index"] for b in serial]).tolist())
  assert len(seen) == N // B * B
