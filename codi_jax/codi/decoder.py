"""Jitted CODI answer decoding over many questions: the student (continuous thoughts), the teacher
(explicit CoT) and the thought probe, shared by training-time validation and `codi_jax.evaluate`.

Questions are tokenized once, left-padded to a length bucket ([bot] appended for the student) and
run through `batching.fixed_batches` on the one `JittedModel`: one compile per (mode, bucket,
batch, num_latent). The training loop passes its live parameters per call (`state=`), so the
decoder never holds a stale copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from codi_jax.batching import bucket_size, fixed_batches, left_pad
from codi_jax.codi import efficiency, inference, probe
from codi_jax.codi.model import Codi, CodiOptions
from codi_jax.data.codi_batches import SpecialIds
from codi_jax.models.jitted import JittedModel

MODES = ("student", "teacher")


@dataclasses.dataclass
class Decoded:
  """One question's greedy continuation."""

  tokens: list[int]  # generated ids, the stop id included
  truncated: bool  # hit max_new_tokens without a stop id


class CodiDecoder:
  """Greedy student/teacher decoding and probing of one CODI model (weights split once)."""

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
  ):
    self.model = model if isinstance(model, JittedModel) else JittedModel(model)
    self.special, self.opts = special, opts
    self.eos_ids = sorted({int(special.eos), *(int(i) for i in eos_ids)})
    self.max_new_tokens, self.buckets = max_new_tokens, buckets
    sp = special
    suppress = {"all": (sp.pad, sp.bot, sp.eot), "eot_only": (sp.eot,)}[mask_special]
    common = {"eos_ids": self.eos_ids, "pad_id": sp.pad, "suppress": suppress}

    def student(codi, ids, mask, *, num_latent, max_new):
      return inference.student_generate(
        codi, ids, mask, num_latent=num_latent, padding_mode=opts.padding_mode, eot_id=sp.eot,
        max_new=max_new, **common,
      )  # fmt: skip

    def teacher(codi, ids, mask, *, max_new):
      return inference.teacher_generate(
        codi, ids, mask, padding_mode=opts.padding_mode, max_new=max_new, **common
      )

    def thoughts(codi, ids, mask, *, num_latent, k, source):
      return probe.probe_top_k(
        codi, ids, mask, k=k, source=source, num_latent=num_latent, padding_mode=opts.padding_mode
      )

    self._fns = {
      "student": self.model.jit(student, static_argnames=("num_latent", "max_new")),
      "teacher": self.model.jit(teacher, static_argnames=("max_new",)),
      "probe": self.model.jit(thoughts, static_argnames=("num_latent", "k", "source")),
    }

  @property
  def compiles(self) -> int:
    return self.model.compiles

  def _static(self, mode: str, num_latent: int | None) -> dict:
    n = self.opts.num_latent if num_latent is None else num_latent
    return {"max_new": self.max_new_tokens, **({"num_latent": n} if mode == "student" else {})}

  def inputs(self, rows: Sequence[Sequence[int]], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """[B, bucket] left-padded ids and mask ([bot] appended for the student)."""
    suffix = [self.special.bot] if mode == "student" else []
    seqs = [list(r) + suffix for r in rows]
    width = bucket_size(max(len(s) for s in seqs), self.buckets)
    return left_pad(seqs, self.special.pad, width)

  def _bucket(self, mode: str):
    extra = 1 if mode == "student" else 0
    return lambda row: bucket_size(len(row) + extra, self.buckets)

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
    fn, static = self._fns[mode], self._static(mode, num_latent)

    def run(rows):
      ids, mask = (self.model.put_batch(x) for x in self.inputs(rows, mode))
      toks, lens = jax.device_get(fn(ids, mask, state=state, **static))
      out = []
      for j in range(len(rows)):
        t = toks[j, : lens[j]].tolist()
        out.append(Decoded(t, len(t) == self.max_new_tokens and t[-1] not in self.eos_ids))
      return out

    return fixed_batches(questions, batch_size, run, bucket=self._bucket(mode), progress=progress)

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
    fn = self._fns["probe"]
    n = self.opts.num_latent if num_latent is None else num_latent

    def run(rows):
      ids, mask = (self.model.put_batch(x) for x in self.inputs(rows, "student"))
      probs, top = jax.device_get(fn(ids, mask, state=state, num_latent=n, k=k, source=source))
      return list(zip(probs, top))

    return fixed_batches(questions, batch_size, run, bucket=self._bucket("student"))

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
    sizes = [self._bucket(mode)(q) for q in questions]
    common = max(set(sizes), key=sizes.count)
    pool = [q for q, size in zip(questions, sizes) if size == common]
    fn, static = self._fns[mode], self._static(mode, num_latent)
    out = {}
    for name, bs in (("batch1", 1), ("batched", batch_size)):
      inputs = []
      for c in range(calls + 1):
        rows = [pool[(c * bs + i) % len(pool)] for i in range(bs)]
        inputs.append(tuple(self.model.put_batch(x) for x in self.inputs(rows, mode)))
      out[name] = efficiency.time_calls(lambda ids, mask: fn(ids, mask, **static), inputs, bs)
    out["question_bucket"] = common
    return out
