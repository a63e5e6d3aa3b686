"""The TFDS/ArrayRecord path on GSM8k's real train.jsonl: same records, batches and resume."""

import shutil
import sys

import numpy as np
import pytest
import shared_data

# requirements-tfds.txt is part of `make install-test`: a missing tensorflow-datasets fails here.
from codi_jax.data import (
  pipeline,
  sources,
  tfds_gsm8k_aug,  # noqa: E402
)
from codi_jax.errors import InputError
from codi_jax.models import tokenizer_bpe
from configs import base

V = 50257
IDS = dict(pad_id=V, bot_id=V + 1, eot_id=V + 2)
B = 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  manual = tmp_path_factory.mktemp("manual")
  shutil.copy(shared_data.path("gsm8k", "train.jsonl"), manual / "train.jsonl")
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds_gsm8k_aug.build(manual, data_dir, "aug")
  return manual, data_dir


def _config(**data):
  c = base.get_config()
  c.data.source = "gsm8k-aug"
  c.data.update(data)
  return c


def _batches(train, n):
  data = pipeline.train_data(
    train, tokenizer_bpe.gpt2_default(), batch_size=B, seed=3, prefetch=2, **IDS
  )
  it = iter(data.dataset)
  return data, it, [next(it) for _ in range(n)]


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_tfds_build_needs_no_tensorflow(built):
  assert "tensorflow" not in sys.modules
  assert tfds_gsm8k_aug.splits(built[1], "aug") == ["train"]
  source, _ = tfds_gsm8k_aug.array_record_source(built[1], "aug", "train")
  assert len(source) == 7473


def test_same_records_batches_and_resume(built):
  manual, data_dir = built
  jsonl = sources.load_records(_config(path=str(manual / "train.jsonl")))
  tfds = sources.load_records(_config(format="tfds", tfds_data_dir=str(data_dir)))
  assert tfds[0] == jsonl[0] and tfds[1] == jsonl[1]  # Train, then the seeded hold-out.
  assert len(tfds[0]) == 7470 - 500 and len(tfds[1]) == 500
  rep_j, rep_t = jsonl[2]["train"], tfds[2]["train"]
  assert rep_t["source"].startswith("tfds:") and rep_t["source"].endswith("train.jsonl")
  assert {**rep_t, "source": ""} == {**rep_j, "source": ""}

  data_j, _, batches_j = _batches(jsonl[0], 5)
  data_t, it, batches_t = _batches(tfds[0], 2)
  assert data_t.shapes == data_j.shapes
  state = it.get_state()
  batches_t += [next(it) for _ in range(3)]
  _same(batches_t, batches_j)  # Identical token batches in the same global order.
  resumed = iter(data_t.dataset)
  resumed.set_state(state)
  _same([next(resumed) for _ in range(3)], batches_j[2:])


def test_tfds_valid_split_and_errors(built, tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  shutil.copy(built[0] / "train.jsonl", manual / "train.jsonl")
  shutil.copy(shared_data.path("gsm8k_aug", "valid.txt"), manual / "valid.txt")
  data_dir = tmp_path / "with_valid"
  tfds_gsm8k_aug.build(manual, data_dir, "aug")
  train, valid, reports = sources.load_records(_config(format="tfds", tfds_data_dir=str(data_dir)))
  assert len(train) == 7470 and len(valid) == 500
  assert reports["valid"]["overlap_with_train"] == 500  # GSM8k-Aug's valid is GSM8k train rows.

  with pytest.raises(InputError, match="no prepared gsm8k_aug/nl dataset; build it with"):
    sources.load_records(_config(source="gsm8k-aug-nl", format="tfds", tfds_data_dir=str(data_dir)))
  with pytest.raises(InputError, match="`||` lines hold no natural-language reasoning"):
    tfds_gsm8k_aug.build(manual, tmp_path / "nl", "nl")
  with pytest.raises(InputError, match="use a local copy or a gcsfuse mount"):
    sources.load_records(_config(format="tfds", tfds_data_dir="gs://bucket/tfds"))
  with pytest.raises(InputError, match="tfds_data_dir: empty"):
    sources.load_records(_config(format="tfds"))
  with pytest.raises(InputError, match="source 'commonsense' has no TFDS dataset"):
    sources.load_records(_config(source="commonsense", format="tfds", tfds_data_dir="x"))
