"""CODI's token sequences (docs/codi.md 6.3), distillation index checked, padded to fixed bucket shapes.

Sequences per example (Lq, Lt, La: padded lengths):
  student encoder [Q][bot], left-padded to Lq;
  teacher [Q][CoT][The answer is: N][eos], right-padded to Lt, labels -100 over Q;
  student decoder [eot][The answer is: N][eos], right-padded to La.
Labels are aligned with the ids (unshifted, as the reference: the loss pairs logits[:, :-1] with
labels[:, 1:]); padding and the decoder's position 0 are -100. Only the teacher positions whose
next label is valid (one per CoT + answer token) need LM-head logits: `teacher_label_pos` lists
them in a fixed window of Lw (`Shapes.teacher_span`) so the loss computes teacher logits there only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from codi_jax.batching import bucket_size
from codi_jax.data.answers import ANSWER_PROMPT
from codi_jax.errors import InputError
from codi_jax.models.tokenizer import Tokenizer

IGNORE = -100
_ENCODE_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids CODI adds (pad = V, bot = V+1, eot = V+2) and the tokenizer's eos."""

  pad: int
  bot: int
  eot: int
  eos: int


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Padded lengths: student encoder (Lq), teacher (Lt), student decoder (La), and the teacher's
  labelled window (Lw: positions whose next label is valid, i.e. CoT + answer; 0: no window, the
  batch has no `teacher_label_pos` and the loss computes logits at all Lt positions)."""

  question: int
  teacher: int
  decoder: int
  teacher_span: int = 0


def _pack(pieces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  offsets = np.zeros(len(pieces) + 1, np.int64)
  np.cumsum([len(p) for p in pieces], out=offsets[1:])
  flat = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
  return flat, offsets


class CodiExamples(Sequence):
  """Tokenized examples stored as flat int32 pieces (compact, cheap to pickle to grain workers).

  Item i is {question, cot, answer (ends in eos), distill (index of the distilled token in the
  answer piece), index (the record's position in the input)}.
  """

  def __init__(
    self,
    questions: list[np.ndarray],
    cots: list[np.ndarray],
    answers: list[np.ndarray],
    distill: Sequence[int],
    record_index: Sequence[int],
    ids: SpecialIds,
  ):
    self._q, self._q_off = _pack(questions)
    self._c, self._c_off = _pack(cots)
    self._a, self._a_off = _pack(answers)
    self.distill = np.asarray(distill, np.int32)
    self.record_index = np.asarray(record_index, np.int32)
    self.ids = ids

  def __len__(self) -> int:
    return len(self.distill)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = range(len(self))[i]
    return dict(
      question=self._q[self._q_off[i] : self._q_off[i + 1]],
      cot=self._c[self._c_off[i] : self._c_off[i + 1]],
      answer=self._a[self._a_off[i] : self._a_off[i + 1]],
      distill=int(self.distill[i]),
      index=int(self.record_index[i]),
    )

  def lengths(self) -> dict[str, np.ndarray]:
    """Unpadded lengths of each example's encoder, teacher and decoder sequences, and the number
    of teacher positions whose next label is valid (`teacher_span`, the `Shapes` field)."""
    q, c, a = np.diff(self._q_off), np.diff(self._c_off), np.diff(self._a_off)
    return dict(
      question=q + 1, teacher=q + c + a, decoder=a + 1, teacher_span=teacher_span(q, q + c + a)
    )


# ---------------------------------------------------------------------------------------------
# Tokenization


def _encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
  """Ids of `texts` with the tokenizer's own special tokens (BOS for Llama), as HF `tokenizer()`."""
  backend = getattr(tokenizer, "backend", None)
  if backend is not None:
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]
  return [tokenizer.encode(t, add_special_tokens=True) for t in texts]


def _strip_bos(ids: list[int], bos: int | None) -> list[int]:
  return ids[1:] if ids and bos is not None and ids[0] == bos else ids


def _prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
  ids = _strip_bos(_encode_all(tokenizer, [prompt])[0], tokenizer.bos_id)
  if not ids:
    raise InputError(f"answer prompt {prompt!r} encodes to no tokens")
  return ids


def _find(seq: Sequence[int], sub: Sequence[int]) -> int:
  n = len(sub)
  for i in range(len(seq) - n + 1):
    if list(seq[i : i + n]) == list(sub):
      return i
  return -1


def infer_distill_offset(tokenizer: Tokenizer, answer_prompt: str = ANSWER_PROMPT) -> int:
  """The distilled token's offset from the prompt's ":" (docs/codi.md 3.2): 1 if the tokenizer puts a lone
  " " token between ":" and a number (Llama-3), else 0 (GPT-2)."""
  prompt = _prompt_ids(tokenizer, answer_prompt)
  ids = _strip_bos(_encode_all(tokenizer, [f"{answer_prompt} 18"])[0], tokenizer.bos_id)
  k = _find(ids, prompt)
  after = ids[k + len(prompt)] if k >= 0 and k + len(prompt) < len(ids) else None
  return int(after is not None and not tokenizer.decode([after], skip_special_tokens=False).strip())


def _distill_in_answer(
  answer: list[int],
  prompt: list[int],
  offset: int,
  tokenizer: Tokenizer,
  answer_prompt: str,
  value: str,
  name: str,
) -> int:
  """Index of the distilled token in the answer piece, checked: everything up to it decodes to
  the prompt, and the next token starts the answer value. An off-by-one fails loudly here."""
  k = _find(answer, prompt)
  if k < 0:
    raise InputError(f"{name}: answer tokens do not contain the tokens of {answer_prompt!r}")
  i = k + len(prompt) - 1 + offset
  if i + 1 >= len(answer):
    raise InputError(f"{name}: distill_offset={offset} runs past the answer {value!r}")

  def text(end: int) -> str:
    return tokenizer.decode(answer[k:end], skip_special_tokens=False).strip()

  head, upto_next = text(i + 1), text(i + 2)
  start = upto_next[len(answer_prompt.strip()) :].strip()
  if head != answer_prompt.strip() or not start or not value.strip().startswith(start):
    tokens = [tokenizer.decode([t], skip_special_tokens=False) for t in answer[k : i + 2]]
    raise InputError(
      f"{name}: with distill_offset={offset} the distilled token is {tokens[-2]!r} and the next "
      f"{tokens[-1]!r} (answer tokens {tokens}); the next token must start the value {value!r}"
    )
  return i


def tokenize_records(
  records: Sequence[Mapping[str, Any]],
  tokenizer: Tokenizer,
  *,
  pad_id: int,
  bot_id: int,
  eot_id: int,
  distill_offset: int = 0,
  max_piece_tokens: int = 256,
  max_token_num: int | None = 1000,
  strip_piece_bos: bool = True,
  answer_prompt: str = ANSWER_PROMPT,
) -> tuple[CodiExamples, dict]:
  """Clean records ({question, cot, answer}) -> checked CODI pieces, and a report of what changed.

  As the reference: pieces tokenized separately with the tokenizer's specials, capped at
  `max_piece_tokens`, a leading BOS stripped from CoT and answer (`strip_piece_bos`); examples
  over `max_token_num` question + CoT + answer tokens dropped. Drops and truncations are counted.
  `distill_offset`: the distilled token's offset from the prompt's ":" (0 GPT-2, 1 Llama-3).
  """
  if distill_offset not in (0, 1):
    raise InputError(f"distill_offset must be 0 (GPT-2) or 1 (Llama), got {distill_offset}")
  if tokenizer.eos_id is None:
    raise InputError(f"{tokenizer!r}: no eos id; CODI appends eos to every answer")
  ids = SpecialIds(pad=pad_id, bot=bot_id, eot=eot_id, eos=tokenizer.eos_id)
  bos = tokenizer.bos_id if strip_piece_bos else None
  prompt = _prompt_ids(tokenizer, answer_prompt)
  cap = max_piece_tokens

  report = {"read": len(records), "kept": 0, "dropped": {"over_max_token_num": 0}}
  report["truncated"] = dict.fromkeys(("question", "cot", "answer"), 0)
  report.update(max_token_num=max_token_num, longest_token_num=0, over_max_examples=[])
  questions, cots, answers, distill, kept = [], [], [], [], []
  checked: dict[tuple[int, ...], int] = {}
  for start in range(0, len(records), _ENCODE_CHUNK):
    chunk = records[start : start + _ENCODE_CHUNK]
    texts = {key: [] for key in ("question", "cot", "answer")}
    for j, record in enumerate(chunk, start):
      for key in texts:
        if key not in record:
          raise InputError(f"example {j}: missing field {key!r}")
      if not isinstance(record["question"], str) or not isinstance(record["cot"], str):
        raise InputError(f"example {j}: question and cot must be strings")
      texts["question"].append(record["question"])
      texts["cot"].append(record["cot"])
      texts["answer"].append(f"{answer_prompt} {record['answer']}")
    encoded = {key: _encode_all(tokenizer, t) for key, t in texts.items()}
    for j, (q, c, a) in enumerate(zip(*encoded.values()), start):
      # The reference measures its raw text (last CoT step included); we measure what we feed.
      token_num = len(q) + len(_strip_bos(c, bos)) + len(_strip_bos(a, bos))
      report["longest_token_num"] = max(report["longest_token_num"], token_num)
      if max_token_num is not None and token_num > max_token_num:
        report["dropped"]["over_max_token_num"] += 1
        if len(report["over_max_examples"]) < 10:
          report["over_max_examples"].append(j)
        continue
      for key, piece in zip(texts, (q, c, a)):
        report["truncated"][key] += int(len(piece) > cap)
      # Cap, then strip BOS, as the reference (a capped Llama piece keeps cap - 1 tokens).
      q, c, a = q[:cap], _strip_bos(c[:cap], bos), _strip_bos(a[:cap], bos) + [ids.eos]
      if tuple(a) not in checked:
        value = str(records[j]["answer"])
        name = f"example {j} (answer {texts['answer'][j - start]!r})"
        checked[tuple(a)] = _distill_in_answer(
          a, prompt, distill_offset, tokenizer, answer_prompt, value, name
        )
      questions.append(np.asarray(q, np.int32))
      cots.append(np.asarray(c, np.int32))
      answers.append(np.asarray(a, np.int32))
      distill.append(checked[tuple(a)])
      kept.append(j)
  report["kept"] = len(kept)
  if n_long := report["dropped"]["over_max_token_num"]:
    longest = report["longest_token_num"]
    logging.warning(
      f"Dropped {n_long} of {len(records)} examples over {max_token_num=} (longest: {longest})."
    )
  if any(report["truncated"].values()):
    logging.warning("Truncated pieces to %d tokens: %s.", cap, report["truncated"])
  if not kept:
    raise InputError(f"no examples left after tokenization: {report}")
  return CodiExamples(questions, cots, answers, distill, kept, ids), report


# ---------------------------------------------------------------------------------------------
# Fixed shapes


def teacher_span(question_len, teacher_len):
  """Teacher positions whose next label is valid: labels cover [len(q), lt) and position p
  predicts label p + 1, so p runs over [max(len(q), 1) - 1, lt - 1)."""
  return teacher_len - np.maximum(question_len, 1)


def fit_shapes(
  examples: CodiExamples, buckets: int | Sequence[int] = 32, max_padding: float = 0.0
) -> Shapes:
  """The bucketed max lengths of `examples`: one shape for every batch, so one compilation.

  Each segment is bucketed on its own (`bucket_size`; with `max_padding` > 0 its multiple follows
  its length, so the few-token decoder is not padded to the question's bucket).
  """
  sizes = {
    k: bucket_size(int(v.max()), buckets, max_padding) for k, v in examples.lengths().items()
  }
  sizes["teacher_span"] = min(sizes["teacher_span"], sizes["teacher"])  # never wider than Lt
  return Shapes(**sizes)


def check_fits(examples: CodiExamples, shapes: Shapes) -> None:
  """Raises InputError if some example is longer than `shapes` allows."""
  for key, lengths in examples.lengths().items():
    if key == "teacher_span" and not shapes.teacher_span:
      continue  # no window: full teacher logits
    if (longest := int(lengths.max())) > getattr(shapes, key):
      raise InputError(f"{key} sequences up to {longest} tokens do not fit {shapes}")


def pad_example(example: Mapping[str, Any], shapes: Shapes, ids: SpecialIds) -> dict:
  """One example as fixed-shape arrays (ids/labels int32, masks bool, indices int32 scalars).

  With `shapes.teacher_span` > 0 it also holds `teacher_label_pos` [Lw]: the teacher positions
  whose next label is valid, then the positions after them (their next label is -100 or past Lt;
  the loss clips and masks them).
  """
  q, c, a = example["question"], example["cot"], example["answer"]
  lq, lt, la = len(q) + 1, len(q) + len(c) + len(a), len(a) + 1
  span = int(teacher_span(len(q), lt))
  if (
    lq > shapes.question
    or lt > shapes.teacher
    or la > shapes.decoder
    or (shapes.teacher_span and span > shapes.teacher_span)
  ):
    raise InputError(f"example {example['index']}: lengths {(lq, lt, la, span)} exceed {shapes}")

  encoder_ids = np.full(shapes.question, ids.pad, np.int32)
  encoder_ids[shapes.question - lq :] = np.concatenate([q, [ids.bot]])
  teacher_ids = np.full(shapes.teacher, ids.pad, np.int32)
  teacher_ids[:lt] = np.concatenate([q, c, a])
  teacher_labels = np.full(shapes.teacher, IGNORE, np.int32)
  teacher_labels[len(q) : lt] = teacher_ids[len(q) : lt]
  decoder_ids = np.full(shapes.decoder, ids.pad, np.int32)
  decoder_ids[:la] = np.concatenate([[ids.eot], a])
  decoder_labels = np.full(shapes.decoder, IGNORE, np.int32)
  decoder_labels[1:la] = a
  window = {}
  if shapes.teacher_span:
    start = max(len(q), 1) - 1
    window["teacher_label_pos"] = (start + np.arange(shapes.teacher_span)).astype(np.int32)
  return dict(
    encoder_ids=encoder_ids,
    encoder_mask=np.arange(shapes.question) >= shapes.question - lq,
    teacher_ids=teacher_ids,
    teacher_labels=teacher_labels,
    teacher_mask=np.arange(shapes.teacher) < lt,
    teacher_distill_index=np.int32(len(q) + len(c) + example["distill"]),
    **window,
    decoder_ids=decoder_ids,
    decoder_labels=decoder_labels,
    decoder_mask=np.arange(shapes.decoder) < la,
    decoder_distill_index=np.int32(1 + example["distill"]),
    index=np.int32(example["index"]),
  )


def collate(examples: Sequence[Mapping[str, Any]], shapes: Shapes, ids: SpecialIds) -> dict:
  """Examples padded with `pad_example` and stacked along a new leading batch axis."""
  rows = [pad_example(e, shapes, ids) for e in examples]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
