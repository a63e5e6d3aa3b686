"""Coconut and iCoT-SI training data: sequences, fixed-shape batches, and the schedules that change
what a batch holds as training goes on (docs/baselines.md, section 4).

Examples are CODI's tokenized pieces (`codi_batches.tokenize_records`); Coconut also splits the CoT
into reasoning steps, each tokenized on its own. Every example is padded once to the bucketed
maxima of the whole dataset; the curriculum then rewrites each batch on the host by cutting tokens
out and shifting the rest to the front inside the same buffers (`drop_tokens`). Shapes never
change, so the training step compiles once per Coconut thought count and once for iCoT-SI.

Batches (B rows):
  Coconut at stage k: encoder [Q][bot] (left-padded), decoder [eot][CoT steps k+1..][answer][eos]
    (right-padded; labels -100 on eot and pads), `num_thoughts` [B] (k * c_thought, or the rules
    of `CoconutSchedule.rows`).
  iCoT-SI: teacher [Q][CoT without its first r tokens][answer][eos] (right-padded, labels -100 over
    Q), `teacher_positions` [B, L] (0..L-1, or each kept token's original position).

Schedules are pure functions of the 1-based optimizer step (their random draws are seeded by the
run's seed and the step), so a resumed run is at the right stage and draws the same offsets.

Over 400 lines on purpose: both baselines share the sequence builders, the in-place token cutting
and the `Curriculum` the training loop talks to; apart, each half would import the other's helpers.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from codi_jax.batching import bucket_size
from codi_jax.data import codi_batches, pipeline
from codi_jax.data.codi_batches import IGNORE, CodiExamples, Shapes, SpecialIds
from codi_jax.errors import InputError
from codi_jax.models.tokenizer import Tokenizer

METHODS = ("coconut", "icot_si")
RESETS = ("none", "schedule", "epoch")
SMOOTHING_SUPPORT = 100  # offsets 0..99, as the reference
_HOST_ONLY = ("index", "step_lens", "num_steps", "cot_start", "cot_len")
_RNG_TAG = {"coconut": 0xC0C0, "icot_si": 0x1C07}

# A reasoning step ends at whitespace after a `<<..>>` calculator span, after a sentence end, or
# before the ` + ` between two partial products of the iCoT multiplication format.
_STEP_END = re.compile(r"(?<=>>)(?=\s)|(?<=[.!?])(?=\s)|(?=\s\+\s)")


# ---------------------------------------------------------------------------------------------
# Sequences


def split_steps(cot: str) -> list[str]:
  """The CoT's reasoning steps as consecutive pieces of its text (they join back to `cot`).

  Steps end after a `<<..>>` span (GSM8k-Aug), a sentence end (GSM8k-Aug-NL) or before a ` + `
  (iCoT multiplication); the separator starts the next step, so each piece tokenizes as it does
  inside the whole CoT.
  Whitespace-only pieces join their neighbour; a CoT without boundaries is one step.
  """
  out, carry = [], ""
  for piece in _STEP_END.split(cot):
    if not piece.strip():
      if out:
        out[-1] += piece
      else:
        carry += piece
      continue
    out.append(carry + piece)
    carry = ""
  return out


def _encode(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
  backend = getattr(tokenizer, "backend", None)
  if backend is not None:
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]
  return [tokenizer.encode(t, add_special_tokens=True) for t in texts]


def _offsets(lengths) -> np.ndarray:
  off = np.zeros(len(lengths) + 1, np.int64)
  np.cumsum(lengths, out=off[1:])
  return off


def cot_lengths(examples: CodiExamples) -> np.ndarray:
  """CoT tokens per example (lengths() counts [Q][bot], [Q][CoT][A] and [eot][A])."""
  n = examples.lengths()
  return n["teacher"] - (n["question"] - 1) - (n["decoder"] - 1)


class StepExamples(Sequence):
  """CODI examples whose CoT is the concatenation of separately tokenized reasoning steps.

  Item i is the `CodiExamples` item plus `step_lens` (tokens per step, int32 [S_i]).
  """

  def __init__(self, base: CodiExamples, step_lens: list[np.ndarray]):
    self.base, self.ids = base, base.ids
    self._off = _offsets([len(x) for x in step_lens])
    self._lens = np.concatenate(step_lens).astype(np.int32) if step_lens else np.zeros(0, np.int32)

  def __len__(self) -> int:
    return len(self.base)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = range(len(self))[i]
    return {**self.base[i], "step_lens": self._lens[self._off[i] : self._off[i + 1]]}

  def num_steps(self) -> np.ndarray:
    return np.diff(self._off)


def tokenize_steps(
  examples: CodiExamples,
  records: Sequence[Mapping[str, Any]],
  tokenizer: Tokenizer,
  *,
  max_piece_tokens: int = 256,
  strip_piece_bos: bool = True,
  chunk: int = 4096,
) -> StepExamples:
  """`examples` with each CoT re-tokenized step by step (`split_steps`), capped at
  `max_piece_tokens` in all (a step crossing the cap is cut, later ones dropped)."""
  bos = tokenizer.bos_id if strip_piece_bos else None
  items = list(examples)
  cots, lens = [], []
  for begin in range(0, len(items), chunk):
    part = items[begin : begin + chunk]
    pieces = [split_steps(records[item["index"]]["cot"]) for item in part]
    encoded = iter(_encode(tokenizer, [p for ps in pieces for p in ps]))
    for ps in pieces:
      steps, used = [], 0
      for _ in ps:
        ids = next(encoded)
        ids = ids[1:] if ids and bos is not None and ids[0] == bos else ids
        ids = ids[: max_piece_tokens - used]
        if ids:
          steps.append(ids)
          used += len(ids)
      cots.append(np.asarray([t for s in steps for t in s], np.int32))
      lens.append(np.asarray([len(s) for s in steps], np.int32))
  base = CodiExamples(
    [item["question"] for item in items],
    cots,
    [item["answer"] for item in items],
    examples.distill,
    examples.record_index,
    examples.ids,
  )
  return StepExamples(base, lens)


@dataclasses.dataclass(frozen=True)
class CoconutShapes:
  """Padded lengths of Coconut's batches: [Q][bot] (Lq), [eot][CoT][answer] (Lc), CoT steps (S)."""

  question: int
  decoder: int
  steps: int


def fit_coconut_shapes(
  examples: StepExamples, buckets: int | Sequence[int], max_padding: float = 0.0
) -> CoconutShapes:
  """The bucketed maxima of `examples` (each segment on its own, `bucket_size`): one shape for
  every batch and stage."""
  lengths = examples.base.lengths()
  decoder = int((lengths["decoder"] + cot_lengths(examples.base)).max())
  return CoconutShapes(
    question=bucket_size(int(lengths["question"].max()), buckets, max_padding),
    decoder=bucket_size(decoder, buckets, max_padding),
    steps=max(1, int(examples.num_steps().max())),
  )


def coconut_example(example: Mapping[str, Any], shapes: CoconutShapes, ids: SpecialIds) -> dict:
  """One example at stage 0: encoder [Q][bot] left-padded, decoder [eot][CoT][answer] right-padded,
  labels on every decoder token after eot, and its steps' token lengths (host-only fields)."""
  q, c, a, lens = example["question"], example["cot"], example["answer"], example["step_lens"]
  lq, ld = len(q) + 1, 1 + len(c) + len(a)
  if lq > shapes.question or ld > shapes.decoder or len(lens) > shapes.steps:
    raise InputError(f"example {example['index']}: lengths {(lq, ld, len(lens))} exceed {shapes}")
  encoder_ids = np.full(shapes.question, ids.pad, np.int32)
  encoder_ids[shapes.question - lq :] = np.concatenate([q, [ids.bot]])
  decoder_ids = np.full(shapes.decoder, ids.pad, np.int32)
  decoder_ids[:ld] = np.concatenate([[ids.eot], c, a])
  decoder_labels = np.where(np.arange(shapes.decoder) < ld, decoder_ids, IGNORE).astype(np.int32)
  decoder_labels[0] = IGNORE
  step_lens = np.zeros(shapes.steps, np.int32)
  step_lens[: len(lens)] = lens
  return dict(
    encoder_ids=encoder_ids,
    encoder_mask=np.arange(shapes.question) >= shapes.question - lq,
    decoder_ids=decoder_ids,
    decoder_labels=decoder_labels,
    decoder_mask=np.arange(shapes.decoder) < ld,
    step_lens=step_lens,
    num_steps=np.int32(len(lens)),
    index=np.int32(example["index"]),
  )


def icot_example(example: Mapping[str, Any], shapes: Shapes, ids: SpecialIds) -> dict:
  """One example's full teacher sequence [Q][CoT][answer] (CODI's padding, labels -100 over Q)
  and where its CoT lies (host-only fields)."""
  full = codi_batches.pad_example(example, shapes, ids)
  keep = ("teacher_ids", "teacher_labels", "teacher_mask", "teacher_label_pos", "index")
  out = {k: full[k] for k in keep if k in full}
  out.update(cot_start=np.int32(len(example["question"])), cot_len=np.int32(len(example["cot"])))
  return out


def drop_tokens(x_BxL, start_B, count_B, fill):
  """Row b of x with count[b] entries from start[b] on cut out, the rest shifted left and `fill`
  appended; also each output entry's source index in x ([B, L]; >= L past the row's end)."""
  L = x_BxL.shape[1]
  j = np.arange(L)[None]
  src = np.where(j < start_B[:, None], j, j + count_B[:, None])
  out = np.take_along_axis(x_BxL, np.minimum(src, L - 1), axis=1)
  return np.where(src < L, out, fill).astype(x_BxL.dtype), src


# ---------------------------------------------------------------------------------------------
# Schedules


@dataclasses.dataclass(frozen=True)
class CoconutSchedule:
  """Coconut's curriculum (reference `dataset.get_cot_latent_dataset`) in optimizer steps.

  Stage k = start_stage + (step - 1) // stage_steps replaces the first k reasoning steps by
  k * c_thought continuous thoughts; past max_latent_stage every step is replaced and the thought
  count stays at max_latent_stage * c_thought (pad_latent_to_max) or min(steps, max_latent_stage)
  * c_thought. With probability uniform_prob a row trains at a uniformly drawn stage 0..(its step
  count). start_stage > 0 continues a run whose earlier stages are already trained (the
  reference's `resume` from its stage-0 checkpoint).
  """

  stage_steps: int
  max_latent_stage: int
  c_thought: int
  pad_latent_to_max: bool = True
  uniform_prob: float = 0.0
  start_stage: int = 0

  def stage(self, step: int) -> int:
    return self.start_stage + (step - 1) // self.stage_steps

  def first_step(self, stage: int) -> int:
    """The step at which `stage` (>= start_stage) begins."""
    return (stage - self.start_stage) * self.stage_steps + 1

  def phase(self, step: int) -> int:
    """The stage as far as training differs: stages past max_latent_stage all train alike."""
    return min(self.stage(step), self.max_latent_stage + 1)

  def num_latent(self, stage: int) -> int:
    """The stage's compiled thought count: the most thoughts one of its rows can run."""
    if self.uniform_prob > 0 or stage > self.max_latent_stage:
      return self.max_latent_stage * self.c_thought
    return stage * self.c_thought

  def eval_latent(self, stage: int) -> int:
    """Thoughts at inference after `stage` (the reference's validation, padded to max)."""
    return min(stage, self.max_latent_stage) * self.c_thought

  def trains_alike(self, a: int, b: int, cot_steps) -> bool:
    """Whether stages a and b train alike on CoTs of these step counts: the same compiled thought
    count, and per row the same steps replaced and thoughts (e.g. the switch past
    max_latent_stage when no CoT has more steps than that); no optimizer restart between them."""
    if self.num_latent(a) != self.num_latent(b):
      return False
    if self.uniform_prob >= 1:
      return True  # every row trains at a drawn stage, whatever the schedule says
    n = np.asarray(cot_steps, np.int64)
    at_schedule = np.ones(len(n))  # draws past uniform_prob: the rows that follow the schedule
    rows_a = self.rows(a, n, at_schedule, at_schedule)
    rows_b = self.rows(b, n, at_schedule, at_schedule)
    return all(np.array_equal(x, y) for x, y in zip(rows_a, rows_b))

  def rows(self, stage: int, num_steps_B, uniform_B=None, pick_B=None):
    """(steps replaced [B], thoughts [B]) per row; uniform_B, pick_B in [0, 1) draw the rows
    trained at a random stage (needed when uniform_prob > 0)."""
    n = np.asarray(num_steps_B, np.int64)
    s = np.full_like(n, stage)
    if self.uniform_prob > 0:
      random_stage = np.minimum(np.floor(pick_B * (n + 1)).astype(np.int64), n)
      s = np.where(uniform_B < self.uniform_prob, random_stage, s)
    top = self.max_latent_stage
    beyond = s > top
    latent = np.where(beyond, top if self.pad_latent_to_max else np.minimum(n, top), s)
    skip = np.where(beyond, n, np.minimum(s, n))
    return skip.astype(np.int32), (latent * self.c_thought).astype(np.int32)


def smoothing_distribution(lam: float, support: int = SMOOTHING_SUPPORT) -> np.ndarray:
  """P(o) = (1 - e^-lam) e^(-lam o) over o = 0..support-1, the missing mass added to the last
  entry; lam = inf puts all mass on o = 0 (the reference's `compute_lambda_distribution`)."""
  p = np.zeros(support)
  if math.isinf(lam):
    p[0] = 1.0
    return p
  p = (1.0 - math.exp(-lam)) * np.exp(-lam * np.arange(support))
  p[-1] += max(0.0, 1.0 - p.sum())
  return p


def sample_offsets(p, uniform_B) -> np.ndarray:
  """Offsets o ~ p (the inverse CDF at uniform [0, 1) draws), int32 [B] in 0..len(p)-1."""
  o = np.searchsorted(np.cumsum(p), uniform_B, side="right")
  return np.minimum(o, len(p) - 1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class ICoTSchedule:
  """iCoT-SI's removal schedule (reference `src/train.py`) in optimizer steps.

  scheduled(step) = remove_start_from + (step - 1) // steps_per_removal, or the whole CoT (inf) once
  it reaches remove_all_beyond; steps_per_removal = 0 adds one at every step, the first included.
  Each row removes scheduled + o tokens from the front of its CoT, o ~ smoothing_distribution.
  """

  steps_per_removal: int
  remove_start_from: int = 0
  remove_all_beyond: float = math.inf
  smoothing_lambda: float = math.inf
  keep_position: bool = False

  def scheduled(self, step: int) -> float:
    b = step - 1
    s = self.remove_start_from + (b // self.steps_per_removal if self.steps_per_removal else b + 1)
    return math.inf if s >= self.remove_all_beyond else s

  def removed(self, step: int, cot_len_B, offsets_B):
    """CoT tokens each row loses at `step`: min(scheduled + offset, its CoT length)."""
    cot = np.asarray(cot_len_B, np.int64)
    s = self.scheduled(step)
    if math.isinf(s):
      return cot.astype(np.int32)
    return np.minimum(s + np.asarray(offsets_B, np.int64), cot).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# The host side of a run


class Curriculum:
  """What each step of a run trains on: batch rewriting, compiled thought count, optimizer resets.

  CODI's methods (`method` not in METHODS) train on the pipeline's batches as they come. This
  process holds rows `first_row`.. of each global batch of `global_rows` (random draws are made
  for the global batch, so any process count draws the same). `steps_per_epoch` counts optimizer
  steps; `longest_cot` (iCoT-SI) and `cot_steps` (Coconut: the CoT step counts, None if unknown)
  describe the training set for the restart rules.
  """

  def __init__(
    self,
    method: str,
    codi_config=None,
    *,
    steps_per_epoch: int = 1,
    longest_cot: int = 0,
    cot_steps: Sequence[int] | None = None,
    seed: int = 0,
    pad_id: int = 0,
    first_row: int = 0,
    global_rows: int = 0,
  ):
    self.method, self.seed, self.pad_id = method, seed, pad_id
    self.steps_per_epoch = max(1, steps_per_epoch)
    self.first_row, self.global_rows = first_row, global_rows
    self.longest_cot = longest_cot
    self.cot_steps = None if cot_steps is None else np.unique(np.asarray(cot_steps, np.int64))
    self.coconut = self.icot = None
    self.reset = "none"
    if method not in METHODS:
      return
    c = codi_config
    self.reset = c.reset_optimizer
    if self.reset not in RESETS:
      raise InputError(
        f"--config.codi.reset_optimizer: {self.reset!r}; choose from {', '.join(RESETS)}"
      )
    if method == "coconut":
      stage_steps = c.stage_steps or c.epochs_per_stage * self.steps_per_epoch
      start = c.coconut_start_stage
      if stage_steps < 1 or c.max_latent_stage < 0 or c.c_thought < 1:
        raise InputError(
          "--config.codi: coconut needs stage_steps (or epochs_per_stage) >= 1, "
          "max_latent_stage >= 0 and c_thought >= 1"
        )
      if not 0 <= start <= c.max_latent_stage:
        raise InputError(
          f"--config.codi.coconut_start_stage: got {start}; expected 0..max_latent_stage="
          f"{c.max_latent_stage}"
        )
      if not 0.0 <= c.uniform_prob <= 1.0:
        raise InputError(f"--config.codi.uniform_prob: {c.uniform_prob} is not in [0, 1]")
      self.coconut = CoconutSchedule(
        int(stage_steps),
        c.max_latent_stage,
        c.c_thought,
        c.pad_latent_to_max,
        float(c.uniform_prob),
        int(start),
      )
    else:
      if c.remove_per_epoch <= 0 or c.removal_smoothing_lambda < 0 or c.remove_start_from < 0:
        raise InputError(
          "--config.codi: icot_si needs remove_per_epoch > 0, remove_start_from >= 0 and "
          "removal_smoothing_lambda >= 0 (inf: no offsets)"
        )
      self.icot = ICoTSchedule(
        int(round(self.steps_per_epoch / c.remove_per_epoch)),
        int(c.remove_start_from),
        float(c.remove_all_when_remove_beyond),
        float(c.removal_smoothing_lambda),
        bool(c.keep_position),
      )
      self.offsets_p = smoothing_distribution(self.icot.smoothing_lambda)

  def num_latent(self, step: int) -> int | None:
    """The compiled thought count at `step` (None: the configured one)."""
    return self.coconut.num_latent(self.coconut.phase(step)) if self.coconut else None

  def eval_latent(self, step: int) -> int | None:
    """Thoughts for validation after `step` (None: the configured inference count)."""
    return self.coconut.eval_latent(self.coconut.stage(step)) if self.coconut else None

  def reset_before(self, step: int) -> bool:
    """Whether the optimizer restarts before `step` (a function of the step: resumes agree)."""
    if step <= 1 or self.reset == "none":
      return False
    if self.reset == "epoch":
      return (step - 1) % self.steps_per_epoch == 0
    if self.coconut:
      # Only a switch that changes what is trained restarts (the one past max_latent_stage can
      # train as the stage before; known from the CoT step counts). `epoch`: the reference's rule.
      a, b = self.coconut.phase(step - 1), self.coconut.phase(step)
      alike = self.cot_steps is not None and self.coconut.trains_alike(a, b, self.cot_steps)
      return a != b and not alike
    before = self.icot.scheduled(step - 1)
    # The reference skips the reset when the previous batch had no CoT left; here: when the
    # schedule alone removed the longest CoT of the training set.
    return self.icot.scheduled(step) > before and before < self.longest_cot

  def scalars(self, step: int) -> dict:
    """Host-side values logged with the step's metrics."""
    if self.coconut:
      return {"coconut/stage": self.coconut.stage(step)}
    if self.icot:
      s = self.icot.scheduled(step)
      return {"icot/scheduled_to_remove": -1 if math.isinf(s) else s}
    return {}

  def draws(self, step: int, micro: int, rows: int, n: int):
    """n arrays of this process's `rows` uniform [0, 1) draws, the same for any process count."""
    rng = np.random.default_rng([self.seed, _RNG_TAG[self.method], step, micro])
    total = max(self.global_rows, self.first_row + rows)
    u = rng.random((n, total))
    return u[:, self.first_row : self.first_row + rows]

  def batch(self, local: Mapping[str, np.ndarray], step: int, micro: int = 0) -> dict:
    """This process's rows of the batch trained at `step` (micro-batch `micro`): device fields."""
    if self.coconut:
      out = self._coconut(local, step, micro)
    elif self.icot:
      out = self._icot(local, step, micro)
    else:
      out = dict(local)
    return {k: v for k, v in out.items() if k not in _HOST_ONLY}

  def _coconut(self, local, step, micro):
    n = local["num_steps"]
    uniform = pick = None
    if self.coconut.uniform_prob > 0:
      uniform, pick = self.draws(step, micro, len(n), 2)
    skip, thoughts = self.coconut.rows(self.coconut.stage(step), n, uniform, pick)
    cum = np.concatenate([np.zeros((len(n), 1), np.int64), np.cumsum(local["step_lens"], 1)], 1)
    count = np.take_along_axis(cum, skip[:, None].astype(np.int64), 1)[:, 0]
    start = np.ones_like(count)  # the CoT starts after eot
    out = dict(local)
    out["decoder_ids"], _ = drop_tokens(local["decoder_ids"], start, count, self.pad_id)
    out["decoder_labels"], _ = drop_tokens(local["decoder_labels"], start, count, IGNORE)
    out["decoder_mask"], _ = drop_tokens(local["decoder_mask"], start, count, False)
    out["num_thoughts"] = thoughts
    return out

  def _icot(self, local, step, micro):
    cot_len = local["cot_len"]
    (u,) = self.draws(step, micro, len(cot_len), 1)
    count = self.icot.removed(step, cot_len, sample_offsets(self.offsets_p, u))
    start = local["cot_start"].astype(np.int64)
    out = dict(local)
    out["teacher_ids"], src = drop_tokens(local["teacher_ids"], start, count, self.pad_id)
    out["teacher_labels"], _ = drop_tokens(local["teacher_labels"], start, count, IGNORE)
    out["teacher_mask"], _ = drop_tokens(local["teacher_mask"], start, count, False)
    L = src.shape[1]
    pos = (
      np.minimum(src, L - 1)
      if self.icot.keep_position
      else np.broadcast_to(np.arange(L), src.shape)
    )
    out["teacher_positions"] = np.ascontiguousarray(pos, dtype=np.int32)
    return out


# ---------------------------------------------------------------------------------------------
# Datasets


def curriculum_dataset(
  examples: Sequence,
  pad: Callable[[Mapping[str, Any]], dict],
  *,
  batch_size: int,
  seed: int = 0,
  num_epochs: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  prefetch: int = 8,
) -> grain.IterDataset:
  """`pipeline.codi_dataset` with another per-example padding: the same global order and the same
  rows per process (see there)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if batch_size % count:
    raise InputError(f"batch_size={batch_size} is not a multiple of the {count} processes")
  if len(examples) < batch_size:
    raise InputError(f"{len(examples)} examples is fewer than batch_size={batch_size}")
  local = batch_size // count
  ds = grain.MapDataset.source(examples).shuffle(seed).repeat(num_epochs)
  if count > 1:
    ds = pipeline._ProcessRows(  # pylint: disable=protected-access
      ds, first=index * local, local=local, global_=batch_size
    )
  ds = ds.map(pad).batch(local, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))


def train_data(
  method: str,
  records: Sequence[Mapping[str, Any]],
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  seed: int = 0,
  buckets: int | Sequence[int] = 32,
  max_padding: float = pipeline.MAX_PADDING,
  prefetch: int = 8,
  **tokenize_kwargs: Any,
) -> pipeline.TrainData:
  """`pipeline.train_data` for coconut | icot_si: tokenized, checked examples -> batches at stage 0
  (the full CoT), which `Curriculum.batch` rewrites step by step. `tokenize_kwargs` go to
  `codi_batches.tokenize_records` (pad_id, bot_id and eot_id included)."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  examples, report = codi_batches.tokenize_records(records, tokenizer, **tokenize_kwargs)
  if method == "coconut":
    cap = tokenize_kwargs.get("max_piece_tokens", 256)
    strip = tokenize_kwargs.get("strip_piece_bos", True)
    examples = tokenize_steps(
      examples, records, tokenizer, max_piece_tokens=cap, strip_piece_bos=strip
    )
    shapes = fit_coconut_shapes(examples, buckets, max_padding)
    pad = functools.partial(coconut_example, shapes=shapes, ids=examples.ids)
    report["coconut_steps"] = {"max": shapes.steps, "mean": float(examples.num_steps().mean())}
  else:
    shapes = codi_batches.fit_shapes(examples, buckets, max_padding)
    pad = functools.partial(icot_example, shapes=shapes, ids=examples.ids)
  ds = curriculum_dataset(examples, pad, batch_size=batch_size, seed=seed, prefetch=prefetch)
  return pipeline.TrainData(ds, examples, shapes, report, len(examples) // batch_size)


def longest_cot(examples: CodiExamples | StepExamples) -> int:
  """The most CoT tokens of any example (iCoT-SI's no-reset-once-all-removed rule)."""
  base = examples.base if isinstance(examples, StepExamples) else examples
  return int(cot_lengths(base).max())
