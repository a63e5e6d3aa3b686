"""CODI sequences with the real GPT-2 tokenizer: layout, distillation index, reports, shapes."""

import re

import numpy as np
import pytest
import tokenizers
from tokenizers import processors

from codi_jax.data import codi_batches as cb
from codi_jax.data import readers, synthetic
from codi_jax.errors import InputError
from codi_jax.models import tokenizer_bpe
from codi_jax.models.tokenizer import Tokenizer

V = 50257
PAD, BOT, EOT = V, V + 1, V + 2
IDS = dict(pad_id=PAD, bot_id=BOT, eot_id=EOT)


@pytest.fixture(scope="module")
def tok():
  return tokenizer_bpe.gpt2_default()


@pytest.fixture(scope="module")
def records():
  return readers.prepare_train_records(synthetic.generate("train", 64, seed=0))[0]


def _real(row, key):
  return row[f"{key}_ids"][row[f"{key}_mask"]]


def test_layout_and_distill_index(tok, records):
  examples, report = cb.tokenize_records(records, tok, **IDS)
  assert report["kept"] == len(examples) == 64 and examples.ids.eos == tok.eos_id
  shapes = cb.fit_shapes(examples, 16)
  batch = cb.collate([examples[i] for i in range(len(examples))], shapes, examples.ids)
  assert batch["teacher_ids"].shape == (64, shapes.teacher)
  for i, record in enumerate(records):
    row = {k: v[i] for k, v in batch.items()}
    answer = f"The answer is: {record['answer']}"
    q = tok.encode(record["question"])
    # Teacher: [Q][CoT][answer][eos], labels -100 over Q and padding.
    teacher = _real(row, "teacher")
    assert tok.decode(teacher, skip_special_tokens=False) == (
      record["question"] + record["cot"] + answer + "<|endoftext|>"
    )
    assert list(teacher[: len(q)]) == q
    assert (row["teacher_labels"][: len(q)] == -100).all()
    np.testing.assert_array_equal(row["teacher_labels"][len(q) : len(teacher)], teacher[len(q) :])
    assert (row["teacher_labels"][len(teacher) :] == -100).all()
    # Labelled window: from the last question token (it predicts the first CoT label) onwards.
    window = len(q) - 1 + np.arange(shapes.teacher_span)
    np.testing.assert_array_equal(row["teacher_label_pos"], window)
    # Encoder: left-padded [Q][bot].
    assert row["encoder_mask"][-1] and not row["encoder_mask"][0]
    assert list(_real(row, "encoder")) == q + [BOT]
    assert (row["encoder_ids"][~row["encoder_mask"]] == PAD).all()
    # Decoder: right-padded [eot][answer][eos].
    decoder = _real(row, "decoder")
    assert decoder[0] == EOT and decoder[-1] == tok.eos_id
    assert tok.decode(decoder[1:], skip_special_tokens=False) == answer + "<|endoftext|>"
    assert row["decoder_labels"][0] == -100
    np.testing.assert_array_equal(row["decoder_labels"][1 : len(decoder)], decoder[1:])
    # The distilled token is the ":" of "The answer is:"; the next one starts the number.
    t, d = row["teacher_distill_index"], row["decoder_distill_index"]
    assert d == 4
    for ids, k in ((row["teacher_ids"], t), (row["decoder_ids"], d)):
      assert tok.decode([ids[k]]) == ":"
      assert tok.decode(ids[k - 3 : k + 1]) == "The answer is:"
      after = tok.decode([ids[k + 1]])
      assert after.startswith(" ") and record["answer"].startswith(after.strip())
    assert row["index"] == i


def test_wrong_offset_is_caught(tok, records):
  answer = f"The answer is: {records[0]['answer']}"
  prefix = f"example 0 (answer {answer!r}): with distill_offset=1 the distilled token is"
  with pytest.raises(InputError, match=re.escape(prefix)):
    cb.tokenize_records(records, tok, distill_offset=1, **IDS)
  with pytest.raises(InputError, match="distill_offset must be 0"):
    cb.tokenize_records(records, tok, distill_offset=2, **IDS)
  assert cb.infer_distill_offset(tok) == 0


def test_llama_like_space_token(tok):
  """A lone " " token after ":" (as Llama-3 emits) needs offset 1, and offset 0 is caught."""
  records = [{"question": "Q?", "cot": "<<1+1=2>>", "answer": " 18"}]
  examples, _ = cb.tokenize_records(records, tok, distill_offset=1, **IDS)
  row = cb.collate([examples[0]], cb.fit_shapes(examples, 8), examples.ids)
  k = row["decoder_distill_index"][0]
  assert k == 5 and tok.decode([row["decoder_ids"][0, k]]) == " "
  assert tok.decode([row["teacher_ids"][0, row["teacher_distill_index"][0]]]) == " "
  with pytest.raises(InputError, match="distilled token is ':' and the next ' '"):
    cb.tokenize_records(records, tok, distill_offset=0, **IDS)


def test_bos_kept_on_question_only(tok):
  backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
  backend.post_processor = processors.TemplateProcessing(
    single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.eos_id)]
  )
  bos_tok = Tokenizer(backend, bos_id=tok.eos_id, eos_id=tok.eos_id)
  records = [{"question": "Q?", "cot": "<<1+1=2>>", "answer": "2"}]
  examples, _ = cb.tokenize_records(records, bos_tok, **IDS)
  ex = examples[0]
  assert ex["question"][0] == tok.eos_id and ex["question"][1:].tolist() == tok.encode("Q?")
  assert ex["cot"].tolist() == tok.encode("<<1+1=2>>")
  assert ex["answer"].tolist() == tok.encode("The answer is: 2") + [tok.eos_id]
  assert ex["distill"] == 3


def test_long_examples_are_counted(tok, records):
  examples, report = cb.tokenize_records(records, tok, max_token_num=70, **IDS)
  dropped = report["dropped"]["over_max_token_num"]
  assert 0 < dropped < len(records) and report["kept"] + dropped == report["read"] == len(records)
  assert report["longest_token_num"] > 70
  assert report["over_max_examples"] and set(report["over_max_examples"]).isdisjoint(
    examples.record_index.tolist()
  )
  assert examples.lengths()["teacher"].max() <= 70 + 1  # + eos
  _, report = cb.tokenize_records(records, tok, max_piece_tokens=8, **IDS)
  assert report["truncated"] == {"question": 64, "cot": report["truncated"]["cot"], "answer": 0}
  assert report["truncated"]["cot"] > 0
  with pytest.raises(InputError, match="no examples left"):
    cb.tokenize_records(records, tok, max_token_num=5, **IDS)
  with pytest.raises(InputError, match="example 1: missing field 'cot'"):
    cb.tokenize_records([records[0], {"question": "q", "answer": "1"}], tok, **IDS)


def test_per_segment_buckets(tok, records):
  """max_padding: each segment's multiple is the largest power of 2 <= max_padding * length, at
  most `buckets`; padding stays under that fraction, and a few-token decoder is not padded."""
  assert [cb.bucket_size(n, 32, 0.125) for n in (7, 30, 65, 94, 300, 1000)] == [
    7, 30, 72, 96, 320, 1024,
  ]  # fmt: skip
  assert cb.bucket_size(65, 32) == cb.bucket_size(65, 32, 0.0) == 96  # the earlier rule
  for n in range(1, 3000):
    size = cb.bucket_size(n, 32, 0.125)
    multiple = min(32, 1 << max(0, int(n / 8).bit_length() - 1))
    assert size % multiple == 0 and n <= size < n + max(1, n / 8)
  # Few shapes: 1..15 tokens exact, then at most 8 sizes per octave until the multiple reaches 32.
  assert len({cb.bucket_size(n, 32, 0.125) for n in range(1, 257)}) == 15 + 8 * 4 + 1
  with pytest.raises(InputError, match="max_padding"):
    cb.bucket_size(10, 32, -0.5)
  examples, _ = cb.tokenize_records(records, tok, **IDS)
  shapes, lengths = cb.fit_shapes(examples, 32, 0.125), examples.lengths()
  for key in ("question", "teacher", "decoder", "teacher_span"):
    longest = int(lengths[key].max())
    assert getattr(shapes, key) == cb.bucket_size(longest, 32, 0.125)
  assert shapes.decoder == int(lengths["decoder"].max())  # under 16 tokens: exact
  cb.check_fits(examples, shapes)


def test_buckets_and_shapes(tok, records):
  assert cb.bucket_size(17, 16) == 32 and cb.bucket_size(16, 16) == 16
  assert cb.bucket_size(40, [128, 32, 64]) == 64
  with pytest.raises(InputError, match="exceeds the largest bucket 64"):
    cb.bucket_size(65, [32, 64])
  examples, _ = cb.tokenize_records(records, tok, **IDS)
  shapes = cb.fit_shapes(examples, 32)
  lengths = examples.lengths()
  for key in ("question", "teacher", "decoder", "teacher_span"):
    size = getattr(shapes, key)
    assert size % 32 == 0 and size - 32 < lengths[key].max() <= size
  q_lens = np.array([len(examples[i]["question"]) for i in range(len(examples))])
  np.testing.assert_array_equal(
    lengths["teacher_span"], lengths["teacher"] - q_lens
  )  # CoT + answer
  assert shapes.teacher_span <= shapes.teacher
  cb.check_fits(examples, shapes)
  # A window too narrow for the longest CoT + answer is rejected; no window (0) checks nothing.
  widest = int(lengths["teacher_span"].max())
  narrow = cb.Shapes(shapes.question, shapes.teacher, shapes.decoder, widest - 1)
  with pytest.raises(InputError, match=r"^teacher_span sequences up to \d+ tokens do not fit"):
    cb.check_fits(examples, narrow)
  longest = examples[int(np.argmax(lengths["teacher_span"]))]
  with pytest.raises(InputError, match="exceed"):
    cb.pad_example(longest, narrow, examples.ids)
  no_window = cb.Shapes(shapes.question, shapes.teacher, shapes.decoder)
  cb.check_fits(examples, no_window)
  assert "teacher_label_pos" not in cb.pad_example(longest, no_window, examples.ids)
  small = cb.Shapes(question=8, teacher=8, decoder=8)
  with pytest.raises(InputError, match="exceed"):
    cb.pad_example(examples[0], small, examples.ids)
  with pytest.raises(InputError, match=r"^question sequences up to \d+ tokens do not fit Shapes"):
    cb.check_fits(examples, small)
