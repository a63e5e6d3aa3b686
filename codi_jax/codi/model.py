"""CODI: one backbone as teacher (explicit CoT) and student (continuous thoughts), self-distilled.

The student encodes [question][bot], runs N continuous thoughts through the shared scan
(last hidden state -> projection -> next input embedding, cache carried), then teacher-forces
[eot][answer] on the cache. The teacher runs [question][CoT][answer]. Hidden states are aligned at
the token before the answer value on every layer (paper arXiv 2502.21074; reference behaviour and
its quirks: shared/spec/codi.md, reachable through `CodiConfig` flags).

Shape legend: B batch, Lq question(+bot) length, La decoder length, Lt teacher length, D model,
V vocab, N thoughts, J hidden-state entries (layers + 1).
"""
# pylint: disable=invalid-name

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from codi_jax.decoding import positions_from_mask
from codi_jax.models import cache as kvc
from codi_jax.models.layers import LayerNorm, dropout, fold, param
from codi_jax.models.step import Loop, scan_steps
from codi_jax.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class CodiConfig:
  """Method options. Defaults follow the reference where it was used for the reported numbers.

  padding_mode: "masked" (ours: pads masked in every pass, positions count real tokens) or
    "official" (reference: latent and answer passes attend to question pads, positions are slot
    indices) or "official_fixmask" (reference fix_attn_mask=True: only the answer pass is masked).
  separate_teacher_target_pass: reference runs the teacher twice (no-grad targets + CE pass, two
    dropout masks); ours by default runs it once and stops gradients on its hidden states.
  train_special_embeddings: reference (False): under LoRA the embedding table is frozen, so pad/bot/eot
    keep their random rows although the paper calls them learnable. True: the table's last 3 rows
    (where train_lib puts pad/bot/eot) live in a separate [3, D] parameter `special` that trains and
    is written into the table at every forward. Moot under full fine-tuning (the table trains).
  """

  num_latent: int = 6
  prj_dim: int = 0  # 0: the model width (reference: prj_dim = d)
  use_prj: bool = True  # False: feed the raw last hidden state back (ablation "w/o projection")
  prj_layernorm: bool = True
  prj_dropout: float = 0.0
  distill_loss: Literal["smooth_l1", "l1", "l2"] = "smooth_l1"
  distill_layers: Literal["all_plus_embedding", "blocks_only"] = "all_plus_embedding"
  distill_div_std: bool = True
  alpha: float = 1.0  # student CE
  beta: float = 1.0  # distillation (Llama scripts: 20)
  gamma: float = 1.0  # teacher CE
  padding_mode: Literal["masked", "official", "official_fixmask"] = "masked"
  separate_teacher_target_pass: bool = False
  method: Literal["codi", "cot_sft", "no_cot_sft"] = "codi"
  train_special_embeddings: bool = False


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
  """The backbone plus the projection; the loss is `codi_loss` below."""

  def __init__(self, backbone: Transformer, cfg: CodiConfig, rngs: nnx.Rngs):
    self.backbone = backbone
    self.cfg = cfg
    d = backbone.cfg.d_model
    self.prj = (
      Projection(
        d, cfg.prj_dim or d, layernorm=cfg.prj_layernorm, dropout_rate=cfg.prj_dropout, rngs=rngs
      )
      if cfg.use_prj
      else None
    )
    table = backbone.embed.embedding
    self.special = (
      param(table[...][-3:].astype(jnp.float32), (None, "embed"))
      if cfg.train_special_embeddings
      else None
    )

  def sync_special_rows(self):
    """Writes the trainable pad/bot/eot rows into the embedding table (no-op unless they train)."""
    if self.special is not None:
      table = (
        self.backbone.embed.embedding
      )  # replaced, not mutated: the frozen tree may be a closure
      self.backbone.embed.embedding = table.replace(
        table[...].at[-3:].set(self.special[...].astype(table.dtype))
      )
    return self

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


def encode_and_think(codi: Codi, batch, rng=None, enc_embeds=None, capacity_extra=None):
  """Encodes [question][bot] into a fresh cache, then runs N continuous thoughts on it.

  Returns (cache ready for the answer pass, next position [B], thoughts [N, B, D]: the input
  embeddings fed at each latent step). enc_embeds [B, Lq, D] replaces the question ids if given.
  The cache leaves room for the decoder batch (or `capacity_extra` slots when decoding).
  """
  cfg, bb = codi.cfg, codi.backbone
  enc_ids, enc_mask = batch["encoder_ids"], batch["encoder_mask"]
  B, Lq = enc_ids.shape
  N = cfg.num_latent
  official = cfg.padding_mode != "masked"
  extra = batch["decoder_ids"].shape[1] if capacity_extra is None else capacity_extra
  cache = kvc.init_cache(bb.cfg, B, Lq + N + extra)
  enc_pos = jnp.broadcast_to(jnp.arange(Lq), (B, Lq)) if official else positions_from_mask(enc_mask)
  enc = bb(
    None if enc_embeds is not None else enc_ids,
    embeds=enc_embeds,
    positions=enc_pos,
    mask=enc_mask,
    cache=cache,
    logits="none",
    rng=fold(rng, 1),
  )
  cache = enc.cache
  answer_valid = cache.valid
  if official:  # the reference's latent (and, unless fixmask, answer) passes see question pads
    cache = cache._replace(valid=cache.valid | (jnp.arange(cache.capacity) < Lq)[None])
  next_pos = jnp.full((B,), Lq) if official else enc_pos[:, -1] + 1
  thoughts = jnp.zeros((0, B, bb.cfg.d_model), jnp.float32)
  if N > 0:
    x = codi.project(enc.hidden[:, -1], fold(rng, 2))

    def next_input(state, out, i):
      z = codi.project(out.hidden, fold(rng, 100 + i))
      return z, state, z

    # N-1 projected feedbacks: the reference's unused z_{N+1} is never computed.
    loop, zs = scan_steps(bb, Loop(x, next_pos, cache, None), next_input, N - 1, rng=fold(rng, 3))
    last = bb(
      embeds=loop.x[:, None],
      positions=loop.pos[:, None],
      cache=loop.cache,
      logits="none",
      rng=fold(rng, 4),
    )
    cache, next_pos = last.cache, loop.pos + 1
    thoughts = jnp.concatenate([x[None].astype(jnp.float32), zs.astype(jnp.float32)], 0)
  if cfg.padding_mode != "official":
    cache = cache._replace(
      valid=cache.valid & (answer_valid | (jnp.arange(cache.capacity) >= Lq)[None])
    )
  return cache, next_pos, thoughts


def student_forward(codi: Codi, batch, rng=None, enc_embeds=None):
  """Encoder -> N thoughts -> teacher-forced [eot][answer] on the cache (hidden states on)."""
  bb, official = codi.backbone, codi.cfg.padding_mode != "masked"
  cache, next_pos, _ = encode_and_think(codi, batch, rng, enc_embeds)
  dec_ids, dec_mask = batch["decoder_ids"], batch["decoder_mask"]
  dec_pos = next_pos[:, None] + (
    jnp.arange(dec_ids.shape[1])[None] if official else positions_from_mask(dec_mask)
  )
  return bb(
    embeds=bb.embed_tokens(dec_ids),
    positions=dec_pos,
    mask=dec_mask,
    cache=cache,
    hidden_states=True,
    rng=fold(rng, 5),
  )


def teacher_forward(codi: Codi, batch, rng=None, hidden_states=True, logits="all"):
  """Teacher pass over [question][CoT][answer]; logits "all", "none" or at positions [B, N]."""
  ids, mask = batch["teacher_ids"], batch["teacher_mask"]
  pos = jnp.broadcast_to(
    jnp.arange(ids.shape[1]), ids.shape
  )  # right-padded, starts at 0 in every mode
  return codi.backbone(
    ids, positions=pos, mask=mask, hidden_states=hidden_states, logits=logits, rng=rng
  )


def _gather(h_BxLxD, idx_B):
  return jnp.take_along_axis(h_BxLxD, idx_B[:, None, None], axis=1)[:, 0]


def codi_loss(codi: Codi, batch, rng=None):
  """(loss, metrics): alpha * CE_student + beta * L_KD + gamma * CE_teacher (per method)."""
  cfg = codi.sync_special_rows().cfg
  metrics = {}
  loss = 0.0
  if cfg.method in ("codi", "cot_sft"):
    window = teacher_label_window(batch)  # logits at the labelled positions only, if batched
    tea = teacher_forward(
      codi,
      batch,
      fold(rng, 10),
      hidden_states=cfg.method == "codi",
      logits="all" if window is None else window[0],
    )
    ce_t = (
      masked_ce(tea.logits, batch["teacher_labels"])
      if window is None
      else token_ce(tea.logits, window[1])
    )
    metrics["ce_teacher"] = ce_t
    loss = loss + (cfg.gamma if cfg.method == "codi" else 1.0) * ce_t
  if cfg.method in ("codi", "no_cot_sft"):
    stu = student_forward(codi, batch, fold(rng, 20))
    ce_s = masked_ce(stu.logits, batch["decoder_labels"])
    metrics["ce_student"] = ce_s
    loss = loss + (cfg.alpha if cfg.method == "codi" else 1.0) * ce_s
  if cfg.method == "codi":
    if cfg.separate_teacher_target_pass:
      tea = teacher_forward(codi, batch, fold(rng, 11), logits="none")  # hidden-state targets only
    s = [_gather(h, batch["decoder_distill_index"]) for h in stu.hidden_states]
    t = [_gather(h, batch["teacher_distill_index"]) for h in tea.hidden_states]
    if cfg.distill_layers == "blocks_only":
      s, t = s[1:], t[1:]
    terms = distill_terms(s, t, cfg.distill_loss, cfg.distill_div_std)
    kd = terms.mean()
    metrics["distill"] = kd
    metrics["distill_per_layer"] = terms
    loss = loss + cfg.beta * kd
  metrics["loss"] = loss
  return loss, metrics
