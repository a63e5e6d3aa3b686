"""Jitted CODI answer decoding over many questions: the student (continuous thoughts), the teacher
(explicit CoT) and the thought probe, shared by training-time validation and `codi_jax.evaluate`.

Questions are tokenized once, left-padded to a length bucket ([bot] appended for the student) and
run through `batching.fixed_batches` on the one `JittedModel`: one compile per (mode, bucket,
batch, num_latent), plus one per cache capacity bucket an answer grows into (length-aware
decoding, `codi_jax.decoding`; `min_capacity=None`: one fixed capacity). The training loop passes
its live parameters per call (`state=`), so the decoder never holds a stale copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from codi_jax.batching import bucket_size, fixed_batches
from codi_jax.codi import efficiency, inference, probe
from codi_jax.codi.model import Codi, CodiOptions
from codi_jax.data.codi_batches import SpecialIds
from codi_jax.decoding import DEFAULT_MIN_CAPACITY, HostDecoder, Segmented, greedy_resume
from codi_jax.models.jitted import JittedModel

MODES = ("student", "teacher")


@dataclasses.dataclass
class Decoded:
  """One question's greedy continuation."""

  tokens: list[int]  # generated ids, the stop id included
  truncated: bool  # hit max_new_tokens without a stop id


class CodiDecoder(HostDecoder):
  """Greedy student/teacher decoding and probing of one CODI model (weights split once; the
  host front end is `decoding.HostDecoder`'s)."""

  def __init__(
    self,
    model: Codi | JittedModel,
    special: SpecialIds,
    eos_ids: Sequence[int],
    *,
    opts: CodiOptions,
    max_new_tokens: int,
    buckets: int | Sequence[int] = 32,
    mask_special: str = "all",
    min_capacity: int | None = DEFAULT_MIN_CAPACITY,
  ):
    super().__init__(model, special.pad, min_capacity)
    self.special, self.opts = special, opts
    self.eos_ids = sorted({int(special.eos), *(int(i) for i in eos_ids)})
    self.max_new_tokens, self.buckets = max_new_tokens, buckets
    sp = special
    suppress = {"all": (sp.pad, sp.bot, sp.eot), "eot_only": (sp.eot,)}[mask_special]
    common = {"eos_ids": self.eos_ids, "pad_id": sp.pad, "suppress": suppress}

    def student(codi, ids, mask, *, num_latent, max_new, capacity, last):
      return inference.student_start(
        codi, ids, mask, num_latent=num_latent, padding_mode=opts.padding_mode, eot_id=sp.eot,
        max_new=max_new, capacity=capacity, last=last, **common,
      )  # fmt: skip

    def teacher(codi, ids, mask, *, max_new, capacity, last):
      return inference.teacher_start(
        codi, ids, mask, padding_mode=opts.padding_mode, max_new=max_new, capacity=capacity,
        last=last, **common,
      )  # fmt: skip

    def thoughts(codi, ids, mask, *, num_latent, k, source):
      return probe.probe_top_k(
        codi, ids, mask, k=k, source=source, num_latent=num_latent, padding_mode=opts.padding_mode
      )

    self._fns = {
      "student": self._segmented(student, "student", suppress),
      "teacher": self._segmented(teacher, "teacher", suppress),
      "probe": self.model.jit(thoughts, static_argnames=("num_latent", "k", "source")),
    }

  def _segmented(self, start, mode: str, suppress):
    """`fn(ids, mask, state=None, *, max_new, [num_latent])` -> (tokens, lengths): `start` and the
    greedy resume driven through the cache's capacity buckets (`decoding.Segmented`)."""
    eos = np.asarray(self.eos_ids, np.int32)

    def resume(codi, seg, st, *, max_new, capacity, last):
      return greedy_resume(
        codi.backbone, seg, st, eos, max_new=max_new, pad_id=self.special.pad, suppress=suppress,
        capacity=capacity, last=last,
      )  # fmt: skip

    student = mode == "student"
    run = Segmented(
      self.model,
      start,
      resume,
      static_argnames=("max_new",),
      start_static_argnames=("num_latent",) if student else (),
      name=mode,
    )

    def call(ids, mask, state=None, *, max_new, num_latent=None):
      caps = self._capacities(mode, ids.shape[1], max_new, num_latent)
      start_static = {"num_latent": num_latent} if student else None
      st = self.decode(
        run, caps, (ids, mask), state=state, start_static=start_static, max_new=max_new
      )
      return st[0], st[2]

    def lower(ids, mask, state=None, *, max_new, num_latent=None):
      """(program, capacities): the run's last bucket as one fixed-capacity program."""
      caps = self._capacities(mode, ids.shape[1], max_new, num_latent)
      start_static = {"num_latent": num_latent} if student else None
      lowered = run.lower(caps[-1], (ids, mask), state=state, start_static=start_static)
      return lowered(max_new=max_new), caps

    call.lower = lower
    return call

  def _capacities(self, mode: str, width: int, max_new: int, num_latent: int | None):
    """Cache buckets of one `mode` run on a [B, width] question batch."""
    if mode == "student":
      return inference.student_capacities(width, num_latent, max_new, self.min_capacity)
    return inference.teacher_capacities(width, max_new, self.min_capacity)

  def lower(self, mode: str, batch: int, width: int, num_latent: int | None = None):
    """(lowered program, cache capacities) of decoding a [batch, width] question batch in `mode`
    (`width` with [bot] for the student) in its last capacity bucket, for ahead-of-time
    compilation (`codi_jax.compile`); nothing is allocated."""
    ids, mask = self.abstract_batch(batch, width)
    return self._fns[mode].lower(ids, mask, **self._static(mode, num_latent))

  def _static(self, mode: str, num_latent: int | None) -> dict:
    n = self.opts.num_latent if num_latent is None else num_latent
    return {"max_new": self.max_new_tokens, **({"num_latent": n} if mode == "student" else {})}

  def inputs(
    self, rows: Sequence[Sequence[int]], mode: str, width: int | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """[B, width] left-padded ids and mask ([bot] appended for the student); width defaults to the
    rows' bucket."""
    suffix = [self.special.bot] if mode == "student" else []
    return self.prompt_batch(rows, self.buckets, width=width, suffix=suffix)

  def bucket(self, mode: str, questions: Sequence[Sequence[int]] = ()):
    """Row -> padded width. Official padding modes batch in input order at one width, as the
    reference's test.py batches (each batch acts as padded to its own longest question: slots
    before it do not exist in those modes), so the numbers are the reference's with one compile."""
    extra = 1 if mode == "student" else 0
    if self.opts.padding_mode != "masked" and questions:
      width = bucket_size(max(len(q) for q in questions) + extra, self.buckets)
      return lambda row: width
    return lambda row: bucket_size(len(row) + extra, self.buckets)

  def widths(self, questions: Sequence[Sequence[int]], mode: str) -> list[int]:
    """The padded widths (compiled shapes) decoding `questions` in `mode` uses."""
    bucket = self.bucket(mode, questions)
    return sorted({bucket(q) for q in questions})

  def generate(
    self,
    questions: Sequence[Sequence[int]],
    mode: str,
    batch_size: int,
    *,
    num_latent: int | None = None,
    state=None,
    progress: str | None = None,
  ) -> list[Decoded]:
    """Greedy continuation of every question (token ids with the tokenizer's own specials)."""
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    bucket = self.bucket(mode, questions)
    self.check_memory(questions, mode, batch_size, num_latent)

    def run(rows):
      return self.decode_rows(rows, mode, bucket(rows[0]), num_latent=num_latent, state=state)

    return fixed_batches(questions, batch_size, run, bucket=bucket, progress=progress)

  def decode_rows(
    self,
    rows: Sequence[Sequence[int]],
    mode: str,
    width: int,
    *,
    num_latent: int | None = None,
    state=None,
  ) -> list[Decoded]:
    """One fixed-shape batch of `generate`: `rows` left-padded to `width` (their `bucket`)."""
    fn, static = self._fns[mode], self._static(mode, num_latent)
    ids, mask = self.put(*self.inputs(rows, mode, width))
    toks, lens = jax.device_get(fn(ids, mask, state=state, **static))
    return [
      Decoded(t, len(t) == self.max_new_tokens and t[-1] not in self.eos_ids)
      for t in self.cut(toks, lens, len(rows))
    ]

  def check_memory(
    self,
    questions: Sequence[Sequence[int]],
    mode: str,
    batch_size: int,
    num_latent: int | None = None,
  ) -> int:
    """Refuses (InputError) decoding `questions` whose widest bucket's last cache capacity
    cannot fit; returns the estimate. Nothing is allocated."""
    if not questions:
      return 0
    static = self._static(mode, num_latent)
    width = max(self.widths(questions, mode))
    max_new = static["max_new"]
    caps = self._capacities(mode, width, max_new, static.get("num_latent"))
    return self.check_fits(batch_size, caps, width, max_new, what=f"{mode} ")

  def probe(
    self,
    questions: Sequence[Sequence[int]],
    batch_size: int,
    *,
    k: int,
    source: str,
    num_latent: int | None = None,
    state=None,
  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per question: (probs [M, k], token ids [M, k]) of every probed thought vector."""
    bucket = self.bucket("student", questions)

    def run(rows):
      return self.probe_rows(
        rows, bucket(rows[0]), k=k, source=source, num_latent=num_latent, state=state
      )

    return fixed_batches(questions, batch_size, run, bucket=bucket)

  def probe_rows(
    self,
    rows: Sequence[Sequence[int]],
    width: int,
    *,
    k: int,
    source: str,
    num_latent: int | None = None,
    state=None,
  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row of one fixed-shape batch (left-padded to `width`, the student's `bucket`): (probs
    [M, k], token ids [M, k]) of every probed thought vector."""
    n = self.opts.num_latent if num_latent is None else num_latent
    ids, mask = self.put(*self.inputs(rows, "student", width))
    fn = self._fns["probe"]
    probs, top = jax.device_get(fn(ids, mask, state=state, num_latent=n, k=k, source=source))
    return list(zip(probs, top))

  def latency(
    self,
    questions: Sequence[Sequence[int]],
    mode: str,
    batch_size: int,
    calls: int,
    *,
    num_latent: int | None = None,
  ) -> dict:
    """Per-problem latency at batch 1 and at `batch_size` on the most common length bucket."""
    sizes = [self.bucket(mode)(q) for q in questions]
    common = max(set(sizes), key=sizes.count)
    pool = [q for q, size in zip(questions, sizes) if size == common]
    fn, static = self._fns[mode], self._static(mode, num_latent)
    out = {}
    for name, bs in (("batch1", 1), ("batched", batch_size)):
      inputs = []
      for c in range(calls + 1):
        rows = [pool[(c * bs + i) % len(pool)] for i in range(bs)]
        inputs.append(self.put(*self.inputs(rows, mode)))
      out[name] = efficiency.time_calls(lambda ids, mask: fn(ids, mask, **static), inputs, bs)
    out["question_bucket"] = common
    return out
