"""CODI: one backbone as teacher (explicit CoT) and student (continuous thoughts), self-distilled.

(Over 400 lines: the options, the student and teacher passes and the loss aligning them are one
algorithm, read together; the baselines reuse its passes and CE helpers.)

The student encodes [question][bot], runs N continuous thoughts through the shared scan
(last hidden state -> projection -> next input embedding, cache carried), then teacher-forces
[eot][answer] on the cache. The teacher runs [question][CoT][answer]. Hidden states are aligned at
the token before the answer value on every layer (paper arXiv 2502.21074; reference behaviour and
its quirks: docs/codi.md, reachable through `CodiOptions` fields). The baselines Coconut and
iCoT-SI reuse these passes (codi_jax/codi/baselines.py, docs/baselines.md).

Shape legend: B batch, Lq question(+bot) length, La decoder length, Lt teacher length, D model,
V vocab, N thoughts, J hidden-state entries (layers + 1).
"""
# pylint: disable=invalid-name

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from codi_jax.errors import InputError
from codi_jax.models import cache as kvc
from codi_jax.models import head_ce
from codi_jax.models.layers import LayerNorm, RematPolicy, dropout, fold, param
from codi_jax.models.positions import PaddingMode, first_column, positions
from codi_jax.models.step import Carry, scan_steps
from codi_jax.models.transformer import Transformer

METHODS = ("codi", "cot_sft", "no_cot_sft", "coconut", "icot_si")
DistillLoss = Literal["smooth_l1", "l1", "l2"]
DistillLayers = Literal["all_plus_embedding", "blocks_only"]
BASELINES = ("coconut", "icot_si")  # losses in codi_jax/codi/baselines.py (losses.py picks)


@dataclasses.dataclass(frozen=True)
class CodiOptions:
  """Method options of one call (loss or decoding); the `Codi` module holds only weights.

  Defaults follow the reference where it was used for the reported numbers (docs/codi.md).

  padding_mode: "masked" (ours: pads masked in every pass, positions count real tokens) or
    "official" (reference: latent and answer passes attend to question pads, positions are slot
    indices; a bucket wider than the batch's longest question acts as padded to that maximum, as
    the reference collator pads) or "official_fixmask" (reference fix_attn_mask=True: only the
    answer pass is masked).
  separate_teacher_target_pass: reference runs the teacher twice (no-grad targets + CE pass, two
    dropout masks); ours by default runs it once and stops gradients on its hidden states.
  remat_thoughts / remat_teacher: recompute the thought scan's / the teacher pass's activations in
    the backward pass (memory options; the teacher per block), keeping what `remat_policy` saves.
  use_prj: feed thoughts through the projection (if the module has one); Coconut: never.
  ce_chunk_logits: the training CE runs the LM head fused with it, this many logits at a time
    (`models.head_ce`: no whole [B, N, V] logits, their gradient made in the forward pass); 0:
    whole logits (same values up to float rounding).
  """

  method: Literal["codi", "cot_sft", "no_cot_sft", "coconut", "icot_si"] = "codi"
  num_latent: int = 6
  distill_loss: DistillLoss = "smooth_l1"
  distill_layers: DistillLayers = "all_plus_embedding"
  distill_div_std: bool = True
  alpha: float = 1.0  # student CE
  beta: float = 1.0  # distillation (Llama scripts: 20)
  gamma: float = 1.0  # teacher CE
  padding_mode: PaddingMode = "masked"
  separate_teacher_target_pass: bool = False
  remat_thoughts: bool = False
  remat_teacher: bool = False
  remat_policy: RematPolicy = "nothing_saveable"
  use_prj: bool = True
  ce_chunk_logits: int = head_ce.CHUNK_LOGITS

  @classmethod
  def from_config(cls, codi_config, *, inference: bool = False) -> CodiOptions:
    """From `config.codi` (a ConfigDict or dict); `inference` uses num_latent_infer if >= 0.

    No-CoT-SFT's student reads [question][bot][eot][answer]: it always has 0 thoughts. Coconut's
    student has the last stage's max_latent_stage * c_thought thoughts and no projection (training
    replaces num_latent per stage); iCoT-SI has no thoughts. Both baselines run padding_mode
    "masked" whatever the config says (the official modes are CODI reference quirks).
    """
    values = dict(codi_config)
    method = values.get("method", "codi")
    if method not in METHODS:
      raise InputError(
        f"--config.codi.method: unknown {method!r}; choose from {', '.join(METHODS)}"
      )
    if method in BASELINES:  # CODI's reference quirks do not apply: pads masked, as Coconut's
      values.update(padding_mode="masked", separate_teacher_target_pass=False)
    opts = cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
    n = opts.num_latent
    if method == "coconut":
      n = values["max_latent_stage"] * values["c_thought"]
      opts = dataclasses.replace(opts, use_prj=False)
    if inference and values.get("num_latent_infer", -1) >= 0:
      n = values["num_latent_infer"]
    if method in ("no_cot_sft", "icot_si"):
      n = 0
    return dataclasses.replace(opts, num_latent=n)


class Stream(enum.IntEnum):
  """Named dropout streams: `fold(rng, stream)` gives each pass its own dropout key."""

  ENCODER = 1
  FIRST_PROJECTION = 2
  THOUGHTS = 3
  LAST_THOUGHT = 4
  ANSWER = 5
  TEACHER = 10
  TEACHER_TARGETS = 11
  STUDENT = 20
  PROJECTION = 100  # then fold_in(step): one key per thought's projection


class Projection(nnx.Module):
  """Dropout -> Linear(D, P) -> GELU (erf) -> Linear(P, D) -> LayerNorm(D), as the reference `prj`."""

  def __init__(self, d: int, p: int, *, layernorm: bool, dropout_rate: float, rngs: nnx.Rngs):
    bound1, bound2 = 1.0 / math.sqrt(d), 1.0 / math.sqrt(p)  # PyTorch Linear default init
    self.w1 = param(
      jax.random.uniform(rngs.params(), (d, p), jnp.float32, -bound1, bound1), ("embed", "mlp")
    )
    self.b1 = param(jax.random.uniform(rngs.params(), (p,), jnp.float32, -bound1, bound1), ("mlp",))
    self.w2 = param(
      jax.random.uniform(rngs.params(), (p, d), jnp.float32, -bound2, bound2), ("mlp", "embed")
    )
    self.b2 = param(
      jax.random.uniform(rngs.params(), (d,), jnp.float32, -bound2, bound2), ("embed",)
    )
    self.ln = (
      LayerNorm(d, eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32) if layernorm else None
    )
    self.dropout_rate = dropout_rate

  def __call__(self, h_BxD, rng=None):
    x = dropout(h_BxD.astype(jnp.float32), self.dropout_rate, rng)
    x = jax.nn.gelu(x @ self.w1[...] + self.b1[...], approximate=False)
    x = x @ self.w2[...] + self.b2[...]
    return x if self.ln is None else self.ln(x)


class Codi(nnx.Module):
  """The backbone plus the projection (weights only); the loss is `codi_jax.codi.losses.loss`.

  train_special_embeddings: reference (False): under LoRA the embedding table is frozen, so
  pad/bot/eot keep their random rows although the paper calls them learnable. True: the table's
  last 3 rows (pad/bot/eot) become a separate [3, D] parameter `embed.special` that trains and
  replaces those rows inside every embedding lookup and LM-head product.
  """

  def __init__(
    self,
    backbone: Transformer,
    *,
    prj_dim: int = 0,
    use_prj: bool = True,
    prj_layernorm: bool = True,
    prj_dropout: float = 0.0,
    train_special_embeddings: bool = False,
    rngs: nnx.Rngs,
  ):
    self.backbone = backbone
    d = backbone.cfg.d_model
    self.prj = (
      Projection(d, prj_dim or d, layernorm=prj_layernorm, dropout_rate=prj_dropout, rngs=rngs)
      if use_prj
      else None
    )
    if train_special_embeddings:
      table = backbone.embed.embedding
      backbone.embed.special = param(table[...][-3:].astype(jnp.float32), (None, "embed"))

  def project(self, h_BxD, rng=None):
    return h_BxD if self.prj is None else self.prj(h_BxD, rng)


def token_ce(logits_BxNxV, labels_BxN):
  """Token-level mean CE of logits against labels at the same index, ignoring labels < 0 (HF -100).

  nll = logsumexp(logits) - logits[label] in f32: no [.., V] log-probability array is built.
  """
  lg = logits_BxNxV.astype(jnp.float32)
  valid = labels_BxN >= 0
  picked = jnp.take_along_axis(lg, jnp.maximum(labels_BxN, 0)[..., None], -1)[..., 0]
  nll = jax.nn.logsumexp(lg, axis=-1) - picked
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(valid.sum(), 1)


def masked_ce(logits_BxLxV, labels_BxL):
  """Token-level mean CE of logits[:, :-1] against labels[:, 1:], ignoring labels < 0 (HF -100)."""
  return token_ce(logits_BxLxV[:, :-1], labels_BxL[:, 1:])


def teacher_label_window(batch):
  """(positions [B, Lw], labels [B, Lw]) of the teacher's labelled window, or None without one.

  Position p predicts teacher_labels[p + 1]; positions at or past Lt - 1 are clipped and their
  label set to -100, so `token_ce` over the window equals `masked_ce` over all Lt positions.
  """
  if "teacher_label_pos" not in batch:
    return None
  pos, labels = batch["teacher_label_pos"], batch["teacher_labels"]
  Lt = labels.shape[1]
  nxt = pos + 1
  lb = jnp.take_along_axis(labels, jnp.minimum(nxt, Lt - 1), axis=1)
  return jnp.minimum(pos, Lt - 1), jnp.where(nxt < Lt, lb, -100)


def next_token_ce(backbone, hidden_BxLxD, labels_BxL, chunk_logits: int):
  """`masked_ce` of the LM head over `hidden` (fused, `models.head_ce`); the last position, which
  has no next label, gets no logits."""
  return head_ce.head_token_ce(backbone, hidden_BxLxD[:, :-1], labels_BxL[:, 1:], chunk_logits)


def teacher_ce(backbone, hidden_BxLxD, batch, chunk_logits: int):
  """CE of a teacher-layout pass: the LM head at the labelled window only if the batch has one
  (`teacher_label_window`), else at every position (`next_token_ce`)."""
  window = teacher_label_window(batch)
  if window is None:
    return next_token_ce(backbone, hidden_BxLxD, batch["teacher_labels"], chunk_logits)
  h_BxWxD = jnp.take_along_axis(hidden_BxLxD, window[0][..., None], axis=1)
  return head_ce.head_token_ce(backbone, h_BxWxD, window[1], chunk_logits)


def distill_terms(student, teacher, kind: str, div_std: bool):
  """Per-entry losses l_j [J]: reference order (SmoothL1 on raw activations, then / std(teacher))."""
  out = []
  for s_BxD, t_BxD in zip(student, teacher):
    s, t = s_BxD.astype(jnp.float32), jax.lax.stop_gradient(t_BxD.astype(jnp.float32))
    diff = s - t
    if kind == "smooth_l1":
      per = jnp.where(jnp.abs(diff) < 1.0, 0.5 * diff**2, jnp.abs(diff) - 0.5)
    elif kind == "l1":
      per = jnp.abs(diff)
    else:
      per = diff**2
    loss = per.mean()
    if div_std:
      std = jnp.std(t, ddof=1)
      loss = loss / (std * std if kind == "l2" else std)
    out.append(loss)
  return jnp.stack(out)


def question_slots(enc_mask_BxLq, capacity: int) -> jax.Array:
  """[capacity] bool: the question slots the reference's unmasked passes see, pads included, from
  the batch's first real column (`models.positions.first_column`) to the end of the question block."""
  slot = jnp.arange(capacity)
  return (slot >= first_column(enc_mask_BxLq)) & (slot < enc_mask_BxLq.shape[1])


def encode_and_think(
  codi: Codi,
  batch,
  *,
  num_latent: int,
  padding_mode: PaddingMode = "masked",
  rng=None,
  enc_embeds=None,
  capacity_extra=None,
  remat: bool = False,
  remat_policy: RematPolicy = "nothing_saveable",
  use_prj: bool = True,
  num_thoughts_B=None,
):
  """Encodes [question][bot] into a fresh cache, then runs `num_latent` continuous thoughts on it.

  Returns (cache ready for the answer pass, next position [B], thoughts [N, B, D]: the input
  embeddings fed at each latent step). enc_embeds [B, Lq, D] replaces the question ids if given.
  The cache leaves room for the decoder batch (or `capacity_extra` slots when decoding).
  use_prj=False feeds the last hidden state back unprojected (Coconut). num_thoughts_B [B] (each
  <= num_latent) keeps only each row's first thoughts: the later slots are masked out and the
  answer starts right after the kept ones, as if the row had run that many thoughts.
  """
  backbone = codi.backbone
  enc_ids, enc_mask = batch["encoder_ids"], batch["encoder_mask"]
  B, Lq = enc_ids.shape
  N = num_latent
  official = padding_mode != "masked"
  extra = batch["decoder_ids"].shape[1] if capacity_extra is None else capacity_extra
  cache = kvc.init_cache(backbone.cfg, B, Lq + N + extra)
  enc_pos = positions(enc_mask, padding_mode)
  enc = backbone(
    None if enc_embeds is not None else enc_ids,
    embeds=enc_embeds,
    positions=enc_pos,
    mask=enc_mask,
    cache=cache,
    logits="none",
    rng=fold(rng, Stream.ENCODER),
  )
  cache = enc.cache
  answer_valid = cache.valid
  if official:  # the reference's latent (and, unless fixmask, answer) passes see question pads
    cache = cache._replace(valid=cache.valid | question_slots(enc_mask, cache.capacity)[None])
  next_pos = enc_pos[:, -1] + 1
  thoughts = jnp.zeros((0, B, backbone.cfg.d_model), jnp.float32)
  project = codi.project if use_prj else (lambda h, rng=None: h)
  if N > 0:
    z_BxD = project(enc.hidden[:, -1], fold(rng, Stream.FIRST_PROJECTION))

    def next_input(state, out, i):
      z = project(out.hidden, fold(rng, Stream.PROJECTION, i))
      return z, state, z

    # N-1 projected feedbacks: the reference's unused z_{N+1} is never computed.
    carry, zs = scan_steps(
      backbone,
      Carry(z_BxD, next_pos, cache, None),
      next_input,
      N - 1,
      rng=fold(rng, Stream.THOUGHTS),
      remat=remat,
      remat_policy=remat_policy,
    )
    last = backbone(
      embeds=carry.x[:, None],
      positions=carry.pos[:, None],
      cache=carry.cache,
      logits="none",
      rng=fold(rng, Stream.LAST_THOUGHT),
    )
    cache, next_pos = last.cache, carry.pos + 1
    thoughts = jnp.concatenate([z_BxD[None].astype(jnp.float32), zs.astype(jnp.float32)], 0)
    if num_thoughts_B is not None:  # drop each row's thoughts past its count
      slot_T = jnp.arange(cache.capacity)[None]
      unused = (slot_T >= Lq + num_thoughts_B[:, None]) & (slot_T < Lq + N)
      cache = cache._replace(valid=cache.valid & ~unused)
      next_pos = next_pos - N + num_thoughts_B
  if padding_mode != "official":
    keep = answer_valid | (jnp.arange(cache.capacity) >= Lq)[None]
    cache = cache._replace(valid=cache.valid & keep)
  return cache, next_pos, thoughts


def student_forward(
  codi: Codi, batch, opts: CodiOptions, rng=None, enc_embeds=None, hidden_states=True, logits="all"
):
  """Encoder -> N thoughts -> teacher-forced [eot][answer] on the cache (logits as `Transformer`).

  A batch with `num_thoughts` [B] runs that many thoughts per row (see `encode_and_think`).
  """
  backbone = codi.backbone
  cache, next_pos, _ = encode_and_think(
    codi,
    batch,
    num_latent=opts.num_latent,
    padding_mode=opts.padding_mode,
    rng=rng,
    enc_embeds=enc_embeds,
    remat=opts.remat_thoughts,
    remat_policy=opts.remat_policy,
    use_prj=opts.use_prj,
    num_thoughts_B=batch.get("num_thoughts"),
  )
  dec_ids, dec_mask = batch["decoder_ids"], batch["decoder_mask"]
  dec_pos = next_pos[:, None] + positions(dec_mask, opts.padding_mode)
  return backbone(
    embeds=backbone.embed_tokens(dec_ids),
    positions=dec_pos,
    mask=dec_mask,
    cache=cache,
    hidden_states=hidden_states,
    logits=logits,
    rng=fold(rng, Stream.ANSWER),
  )


def teacher_forward(
  codi: Codi,
  batch,
  rng=None,
  hidden_states=True,
  logits="all",
  remat: bool = False,
  remat_policy: RematPolicy = "nothing_saveable",
):
  """Teacher pass over [question][CoT][answer]; logits "all", "none" or at positions [B, N].

  remat=True recomputes each block's activations in the backward pass (`Transformer` remat)."""
  ids, mask = batch["teacher_ids"], batch["teacher_mask"]
  # Right-padded, so every row starts at position 0 in every padding mode.
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  return codi.backbone(
    ids,
    positions=pos,
    mask=mask,
    hidden_states=hidden_states,
    logits=logits,
    rng=rng,
    remat=remat,
    remat_policy=remat_policy,
  )


def _gather(h_BxLxD, idx_B):
  return jnp.take_along_axis(h_BxLxD, idx_B[:, None, None], axis=1)[:, 0]


def codi_loss(codi: Codi, batch, opts: CodiOptions, rng=None):
  """(loss, metrics): alpha * CE_student + beta * L_KD + gamma * CE_teacher (per method).

  Coconut and iCoT-SI have their own losses (codi_jax/codi/baselines.py); `losses.loss` picks
  each method's.
  """
  if opts.method in BASELINES:
    raise ValueError(f"codi_loss: {opts.method} has its own loss (codi_jax.codi.losses.loss)")
  metrics = {}
  loss = 0.0
  if opts.method in ("codi", "cot_sft"):
    tea = teacher_forward(
      codi,
      batch,
      fold(rng, Stream.TEACHER),
      hidden_states=opts.method == "codi",
      logits="none",
      remat=opts.remat_teacher,
      remat_policy=opts.remat_policy,
    )
    ce_t = teacher_ce(codi.backbone, tea.hidden, batch, opts.ce_chunk_logits)
    metrics["ce_teacher"] = ce_t
    loss = loss + (opts.gamma if opts.method == "codi" else 1.0) * ce_t
  if opts.method in ("codi", "no_cot_sft"):
    stu = student_forward(codi, batch, opts, fold(rng, Stream.STUDENT), logits="none")
    ce_s = next_token_ce(codi.backbone, stu.hidden, batch["decoder_labels"], opts.ce_chunk_logits)
    metrics["ce_student"] = ce_s
    loss = loss + (opts.alpha if opts.method == "codi" else 1.0) * ce_s
  if opts.method == "codi":
    if opts.separate_teacher_target_pass:  # hidden-state targets only
      tea = teacher_forward(codi, batch, fold(rng, Stream.TEACHER_TARGETS), logits="none")
    s = [_gather(h, batch["decoder_distill_index"]) for h in stu.hidden_states]
    t = [_gather(h, batch["teacher_distill_index"]) for h in tea.hidden_states]
    if opts.distill_layers == "blocks_only":
      s, t = s[1:], t[1:]
    terms = distill_terms(s, t, opts.distill_loss, opts.distill_div_std)
    kd = terms.mean()
    metrics["distill"] = kd
    metrics["distill_per_layer"] = terms
    loss = loss + opts.beta * kd
  metrics["loss"] = loss
  return loss, metrics
