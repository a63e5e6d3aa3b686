"""Decoder-only LMs in Flax NNX: GPT-2, Llama (Llama-3.x, SmolLM2) and Qwen2, used functionally.

One forward takes token ids or input embeddings, explicit positions, a padding mask and an optional
explicit KV cache, and returns logits (everywhere, at chosen positions, or nowhere), the last hidden
state and, on request, every hidden state in HF's `output_hidden_states` convention.

Shape legend: B batch, L input length, T cache capacity, D model, V vocab, N gathered positions,
H heads, K kv heads, Dh head dim, HDh = H * Dh, F MLP width.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from codi_jax.models import cache as kvc
from codi_jax.models import layout
from codi_jax.models.config import ModelConfig
from codi_jax.models.layers import (
  Embed,
  LayerNorm,
  Linear,
  RematPolicy,
  RMSNorm,
  attention,
  checkpoint,
  dropout,
  fold,
  rope,
  rope_inv_freq,
  rope_tables,
)
from codi_jax.models.partitioning import constrain

_ACT = ("batch", None, "act_embed")  # the residual stream


class Output(NamedTuple):
  logits: jax.Array | None  # [B, L, V], [B, N, V], [B, V] ("last") or None; f32
  hidden: jax.Array  # [B, L, D] last hidden state (after the final norm)
  hidden_states: tuple[jax.Array, ...] | None  # L+1 x [B, L, D], HF convention
  cache: kvc.KVCache | None


def _linear(
  cfg: ModelConfig, name: str, din: int, dout: int, bias: bool, axes, rngs, init_std=0.02
):
  targets = cfg.lora_targets
  lora = cfg.lora if any(name == t or name.endswith("." + t) for t in targets) else None
  return Linear(
    din,
    dout,
    bias=bias,
    axes=axes,
    dtype=jnp.dtype(cfg.dtype),
    param_dtype=jnp.dtype(cfg.param_dtype),
    lora=lora,
    rngs=rngs,
    init_std=init_std,
  )


def _attend_cached(
  q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, kv, layer, end, allowed_BxLxT, cfg: ModelConfig, rng
):
  """Writes the new k/v into layer `layer` of the cache (if any) and attends over that layer.

  kv: None (no cache: attend over this call's keys) or every layer's (k, v) [N, B, T, K, Dh].
  Returns (attention output [B, L, H*Dh], the cache's (k, v) with this layer written, or None).
  """
  k, v = k_BxLxKxDh, v_BxLxKxDh
  if kv is not None:
    (k_all, k), (v_all, v) = kvc.write(kv[0], k, layer, end), kvc.write(kv[1], v, layer, end)
    kv = (k_all, v_all)
  o_BxLxHDh = attention(
    q_BxLxHxDh,
    k,
    v,
    allowed_BxLxT,
    attn_dropout=cfg.attn_dropout,
    rng=rng,
    impl=cfg.attention_impl,
  )
  return o_BxLxHDh, kv


class GPT2Block(nnx.Module):
  """Pre-LN block: fused c_attn, c_proj, MLP c_fc -> gelu_new -> c_proj; biases everywhere."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, F, dt, pdt = cfg.d_model, cfg.d_ff, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    resid_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    self.cfg = cfg
    self.ln_1 = LayerNorm(D, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.c_attn = _linear(cfg, "attn.c_attn", D, 3 * D, True, ("embed", "heads"), rngs)
    self.attn_c_proj = _linear(cfg, "attn.c_proj", D, D, True, ("heads", "embed"), rngs, resid_std)
    self.ln_2 = LayerNorm(D, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.c_fc = _linear(cfg, "mlp.c_fc", D, F, True, ("embed", "mlp"), rngs)
    self.mlp_c_proj = _linear(cfg, "mlp.c_proj", F, D, True, ("mlp", "embed"), rngs, resid_std)

  def __call__(self, x_BxLxD, rope_cs, kv, layer, allowed_BxLxT, end, rng):
    """rng sub-keys per purpose: 0-6 are c_attn, attention, c_proj, resid, c_fc, c_proj, resid."""
    del rope_cs  # GPT-2 adds learned positions at the embedding
    cfg, (B, L, _) = self.cfg, x_BxLxD.shape
    h_BxLxD = self.ln_1(x_BxLxD)
    q, k, v = jnp.split(self.c_attn(h_BxLxD, fold(rng, 0)), 3, axis=-1)
    BxLxHxDh = (B, L, cfg.num_heads, cfg.head_dim)
    o_BxLxHDh, kv = _attend_cached(
      q.reshape(BxLxHxDh),
      k.reshape(BxLxHxDh),
      v.reshape(BxLxHxDh),
      kv,
      layer,
      end,
      allowed_BxLxT,
      cfg,
      fold(rng, 1),
    )
    attn_BxLxD = self.attn_c_proj(o_BxLxHDh, fold(rng, 2))
    x_BxLxD = x_BxLxD + dropout(attn_BxLxD, cfg.resid_dropout, fold(rng, 3))
    h_BxLxF = jax.nn.gelu(self.c_fc(self.ln_2(x_BxLxD), fold(rng, 4)), approximate=True)
    mlp_BxLxD = self.mlp_c_proj(h_BxLxF, fold(rng, 5))
    x_BxLxD = x_BxLxD + dropout(mlp_BxLxD, cfg.resid_dropout, fold(rng, 6))
    return x_BxLxD, kv


class LlamaBlock(nnx.Module):
  """RMSNorm, RoPE GQA attention (q/k/v bias for Qwen2), SwiGLU MLP; no other biases."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, F, H, K, Dh = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    resid_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    self.cfg = cfg
    self.input_layernorm = RMSNorm(D, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.q_proj = _linear(
      cfg, "self_attn.q_proj", D, H * Dh, cfg.qkv_bias, ("embed", "heads"), rngs
    )
    self.k_proj = _linear(cfg, "self_attn.k_proj", D, K * Dh, cfg.qkv_bias, ("embed", "kv"), rngs)
    self.v_proj = _linear(cfg, "self_attn.v_proj", D, K * Dh, cfg.qkv_bias, ("embed", "kv"), rngs)
    self.o_proj = _linear(
      cfg, "self_attn.o_proj", H * Dh, D, False, ("heads", "embed"), rngs, resid_std
    )
    self.post_attention_layernorm = RMSNorm(D, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.gate_proj = _linear(cfg, "mlp.gate_proj", D, F, False, ("embed", "mlp"), rngs)
    self.up_proj = _linear(cfg, "mlp.up_proj", D, F, False, ("embed", "mlp"), rngs)
    self.down_proj = _linear(cfg, "mlp.down_proj", F, D, False, ("mlp", "embed"), rngs, resid_std)

  def __call__(self, x_BxLxD, rope_cs, kv, layer, allowed_BxLxT, end, rng):
    """rng sub-keys per purpose: 0-7 are q, k, v, attention, o, gate, up, down (LoRA dropout)."""
    cfg, (B, L, _) = self.cfg, x_BxLxD.shape
    H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    h_BxLxD = self.input_layernorm(x_BxLxD)
    q_BxLxHxDh = rope(self.q_proj(h_BxLxD, fold(rng, 0)).reshape(B, L, H, Dh), rope_cs)
    k_BxLxKxDh = rope(self.k_proj(h_BxLxD, fold(rng, 1)).reshape(B, L, K, Dh), rope_cs)
    v_BxLxKxDh = self.v_proj(h_BxLxD, fold(rng, 2)).reshape(B, L, K, Dh)
    o_BxLxHDh, kv = _attend_cached(
      q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, kv, layer, end, allowed_BxLxT, cfg, fold(rng, 3)
    )
    x_BxLxD = x_BxLxD + self.o_proj(o_BxLxHDh, fold(rng, 4))
    h_BxLxD = self.post_attention_layernorm(x_BxLxD)
    gate_BxLxF = jax.nn.silu(self.gate_proj(h_BxLxD, fold(rng, 5)))
    h_BxLxF = gate_BxLxF * self.up_proj(h_BxLxD, fold(rng, 6))
    return x_BxLxD + self.down_proj(h_BxLxF, fold(rng, 7)), kv


class Transformer(nnx.Module):
  """Embeddings -> blocks -> final norm -> (tied or untied) LM head."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.embed = Embed(
      cfg.vocab_size, cfg.d_model, axes=("vocab", "embed"), dtype=dt, param_dtype=pdt, rngs=rngs
    )
    gpt2 = cfg.arch == "gpt2"
    self.pos_embed = (
      Embed(
        cfg.max_positions,
        cfg.d_model,
        axes=(None, "embed"),
        dtype=dt,
        param_dtype=pdt,
        rngs=rngs,
        init_std=0.01,
      )
      if gpt2
      else None
    )
    block = GPT2Block if gpt2 else LlamaBlock
    blocks = [block(cfg, rngs) for _ in range(cfg.num_layers)]  # same init in either layout
    self.blocks = layout.stack(blocks) if cfg.scan_layers else nnx.List(blocks)
    norm = LayerNorm if gpt2 else RMSNorm
    self.final_norm = norm(cfg.d_model, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.lm_head = (
      None
      if cfg.tie_embeddings
      else Linear(
        cfg.d_model,
        cfg.vocab_size,
        bias=False,
        axes=("embed", "vocab"),
        dtype=dt,
        param_dtype=pdt,
        lora=None,
        rngs=rngs,
      )
    )

  def embed_tokens(self, ids):
    """Input embeddings of token ids (no position term); what soft/latent inputs replace."""
    return self.embed(jnp.clip(ids, 0, self.embed.embedding.shape[0] - 1))

  def head(self, h_BxLxD):
    """LM-head logits in f32."""
    if self.lm_head is None:
      out = self.embed.attend(h_BxLxD)
    else:
      out = jnp.einsum(
        "...d,dv->...v",
        h_BxLxD,
        self.lm_head.kernel[...].astype(h_BxLxD.dtype),
        preferred_element_type=jnp.float32,
      )
    return constrain(out, ("batch",) + (None,) * (out.ndim - 2) + ("act_vocab",))

  def __call__(
    self,
    tokens=None,
    *,
    embeds=None,
    positions,
    mask=None,
    cache: kvc.KVCache | None = None,
    logits="all",
    hidden_states: bool = False,
    rng: jax.Array | None = None,
    remat: bool = False,
    remat_policy: RematPolicy = "nothing_saveable",
  ) -> Output:
    """Runs L inputs (ids [B, L] or embeddings [B, L, D]) at `positions` [B, L].

    mask [B, L] marks real inputs (default all); with a cache the inputs fill slots end..end+L-1
    and attend to every valid earlier slot. logits: "all", "last", "none" or indices [B, N].
    rng enables dropout (None: deterministic). remat=True wraps each block in jax.checkpoint under
    `remat_policy` (its activations are recomputed in the backward pass; same values).
    """
    cfg = self.cfg
    if (tokens is None) == (embeds is None):
      raise ValueError("pass exactly one of tokens or embeds")
    x_BxLxD = self.embed_tokens(tokens) if embeds is None else embeds.astype(jnp.dtype(cfg.dtype))
    B, L = x_BxLxD.shape[:2]
    if self.pos_embed is not None:
      x_BxLxD = x_BxLxD + self.pos_embed(jnp.clip(positions, 0, cfg.max_positions - 1))
    x_BxLxD = constrain(dropout(x_BxLxD, cfg.embed_dropout, fold(rng, 0)), _ACT)
    mask_BxL = jnp.ones((B, L), bool) if mask is None else mask.astype(bool)

    q_slot = jnp.arange(L)
    if cache is None:
      end, key_valid_BxT, kv = None, mask_BxL, None
    else:
      end = cache.end
      q_slot = q_slot + end
      key_valid_BxT = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask_BxL, end, axis=1)
      kv = (cache.k, cache.v)
    T = key_valid_BxT.shape[1]
    slot_T = jnp.arange(T)
    allowed_BxLxT = key_valid_BxT[:, None, :] & (slot_T[None, None, :] <= q_slot[None, :, None])
    # A query with no visible key (a left pad) attends with its real scores to every key that
    # exists in this call, as PyTorch's SDPA does on CUDA (where the reference's runs were made;
    # eager attention would make it uniform): the cache's real keys and the whole block from its
    # first real column on (earlier bucket slots are wider than the batch and do not exist). Only
    # pad rows change; real rows never see them unless the reference's unmasked passes are asked
    # for (CODI's official padding modes; docs/codi.md section 10.1).
    start = (0 if end is None else end) + jnp.argmax(jnp.any(mask_BxL, axis=0))
    block_T = (slot_T >= start) & (slot_T < (0 if end is None else end) + L)
    exists_BxT = key_valid_BxT | block_T[None]
    no_key_BxLx1 = ~jnp.any(allowed_BxLxT, axis=-1, keepdims=True)
    allowed_BxLxT = jnp.where(no_key_BxLx1, exists_BxT[:, None, :], allowed_BxLxT)

    rope_cs = (
      None
      if self.pos_embed is not None
      else rope_tables(
        positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), x_BxLxD.dtype
      )
    )

    def layer_fn(blk, x_BxLxD, kv, *, i):
      """Block i: (residual stream, cache (k, v) or None) -> the same after block i."""
      x_BxLxD, kv = blk(x_BxLxD, rope_cs, kv, i, allowed_BxLxT, end, fold(rng, i + 1))
      return constrain(x_BxLxD, _ACT), kv

    if cfg.scan_layers:
      x_BxLxD, kv, all_h = _scan_blocks(
        self.blocks, layer_fn, x_BxLxD, kv, cfg.num_layers, hidden_states, remat, remat_policy
      )
    else:
      all_h = []
      for i, blk in enumerate(self.blocks):
        if hidden_states:
          all_h.append(x_BxLxD)
        run = functools.partial(layer_fn, blk, i=i)
        x_BxLxD, kv = (checkpoint(run, remat_policy) if remat else run)(x_BxLxD, kv)
    h_BxLxD = self.final_norm(x_BxLxD)
    if hidden_states:
      all_h.append(h_BxLxD)

    if isinstance(logits, str):
      out = {
        "all": lambda: self.head(h_BxLxD),
        "last": lambda: self.head(h_BxLxD[:, -1]),
        "none": lambda: None,
      }[logits]()
    else:
      out = self.head(jnp.take_along_axis(h_BxLxD, logits[..., None], axis=1))
    new_cache = None if cache is None else kvc.advance(cache, *kv, mask_BxL)
    return Output(out, h_BxLxD, tuple(all_h) if hidden_states else None, new_cache)

  def resize_vocab(self, new_size: int, key: jax.Array):
    """Grows the vocabulary; new rows ~ N(mean, 1e-9 * cov) of the old rows, as HF mean-resizing."""
    old = self.cfg.vocab_size
    if new_size < old:
      raise ValueError(f"resize_vocab only grows: {new_size} < {old}")
    k1, k2 = jax.random.split(key)
    self.embed.embedding.set_value(_mean_resize(self.embed.embedding[...], new_size, k1))
    if self.lm_head is not None:
      self.lm_head.kernel.set_value(_mean_resize(self.lm_head.kernel[...].T, new_size, k2).T)
    self.cfg = self.cfg.replace(vocab_size=new_size)
    for blk in [self.blocks] if self.cfg.scan_layers else self.blocks:
      blk.cfg = self.cfg


def _scan_blocks(blocks, layer_fn, x_BxLxD, kv, num_layers, hidden_states, remat, remat_policy):
  """Every layer of stacked `blocks` in one `lax.scan` (one compiled block, whatever the depth).

  The cache rides in the carry and each layer writes only its new slots (`kvc.write`); remat wraps
  the scanned body (one block) under `remat_policy`. Returns (x, kv, hidden states before each
  block or []).
  """
  graphdef, stacked = nnx.split(blocks)

  def body(carry, xs):
    x_BxLxD, kv = carry
    params, i = xs
    out = layer_fn(nnx.merge(graphdef, params), x_BxLxD, kv, i=i)
    return out, (x_BxLxD if hidden_states else None)

  if remat:
    body = checkpoint(body, remat_policy, prevent_cse=False)
  (x_BxLxD, kv), h_NxBxLxD = jax.lax.scan(body, (x_BxLxD, kv), (stacked, jnp.arange(num_layers)))
  return x_BxLxD, kv, ([] if h_NxBxLxD is None else list(h_NxBxLxD))


def _mean_resize(w_VxD: jax.Array, new_size: int, key: jax.Array) -> jax.Array:
  """HF `_init_added_embeddings_weights_with_mean` (in f32, as HF): N(mu, 1e-9 * Sigma) rows, or mu
  where 1e-9 * Sigma is not positive definite. Traceable, so sharded init can jit it."""
  n_new = new_size - w_VxD.shape[0]
  if n_new == 0:
    return w_VxD
  w = w_VxD.astype(jnp.float32)
  mu = w.mean(0)
  centered = w - mu
  cov = jnp.matmul(centered.T, centered, precision=jax.lax.Precision.HIGHEST) / w.shape[0]
  chol = jnp.linalg.cholesky(1e-9 * cov)
  z = jax.random.normal(key, (n_new, w.shape[1]), jnp.float32)
  sampled = mu + jnp.matmul(z, chol.T, precision=jax.lax.Precision.HIGHEST)
  rows = jnp.where(jnp.all(jnp.isfinite(chol)), sampled, jnp.broadcast_to(mu, sampled.shape))
  return jnp.concatenate([w_VxD, rows.astype(w_VxD.dtype)], 0)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """A randomly initialised model (unsharded; sharded init goes through eval_shape + jit)."""
  return Transformer(cfg, nnx.Rngs(params=seed))
