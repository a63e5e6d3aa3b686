"""NNX building blocks: LoRA-capable linear, embedding, norms, RoPE, masked GQA attention, remat.

Shape legend: B batch, L query length, T key/cache length, D model, H heads, K kv heads,
G = H // K, Dh head dim, F ffn width, V vocab, R LoRA rank.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import math
import typing
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from codi_jax.models import random_bits
from codi_jax.models.config import AttentionImpl, LoRAConfig, RopeScaling

_NEG = float(jnp.finfo(jnp.float32).min)

# What a rematerialised region keeps for the backward pass (jax.checkpoint_policies): nothing (all
# recomputed), every matmul output, or the matmuls without batch dimensions (the projections and
# MLP, not the attention scores).
RematPolicy = Literal["nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"]


def checkpoint(fn, policy: RematPolicy = "nothing_saveable", prevent_cse: bool = True):
  """jax.checkpoint (remat) of fn under a named policy: its activations are recomputed in the
  backward pass, except what the policy saves. prevent_cse=False inside scan/while bodies (the
  loop already keeps the recomputation apart; jax.checkpoint's documentation)."""
  if policy not in typing.get_args(RematPolicy):
    raise ValueError(
      f"unknown remat policy {policy!r}; supported: {', '.join(typing.get_args(RematPolicy))}"
    )
  return jax.checkpoint(
    fn, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=prevent_cse
  )


def param(value, axes, kind=nnx.Param):
  """A parameter annotated with logical axes; sharding is applied by jit out_shardings, not eagerly."""
  return kind(value, out_sharding=axes, eager_sharding=False)


def dropout(x, rate: float, rng: jax.Array | None):
  """Inverted dropout; a no-op when rng is None (deterministic) or rate is 0. The mask comes from
  16-bit draws (`random_bits.keep_mask`: a quarter of bernoulli's threefry hashes)."""
  if rng is None or rate == 0.0:
    return x
  keep = random_bits.keep_mask(rng, rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def fold(rng: jax.Array | None, *ids: int) -> jax.Array | None:
  """Derives a sub-key per (layer, purpose); passes None through."""
  for i in ids:
    if rng is None:
      return None
    rng = jax.random.fold_in(rng, i)
  return rng


class Linear(nnx.Module):
  """y = x @ W + b with W [in, out] (GPT-2 Conv1D layout) and optional peft-style LoRA."""

  def __init__(
    self,
    din: int,
    dout: int,
    *,
    bias: bool,
    axes: tuple[str, str],
    dtype,
    param_dtype,
    lora: LoRAConfig | None,
    rngs: nnx.Rngs,
    init_std: float = 0.02,
  ):
    self.dtype = dtype
    w = init_std * jax.random.normal(rngs.params(), (din, dout), param_dtype)
    self.kernel = param(w, axes)
    self.bias = param(jnp.zeros((dout,), param_dtype), axes[1:]) if bias else None
    self.lora_scale = None
    if lora is not None:
      # peft init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0. Kept in f32.
      bound = 1.0 / math.sqrt(din)
      a = jax.random.uniform(rngs.params(), (din, lora.rank), jnp.float32, -bound, bound)
      self.lora_a = param(a, (axes[0], None), nnx.LoRAParam)
      self.lora_b = param(jnp.zeros((lora.rank, dout), jnp.float32), (None, axes[1]), nnx.LoRAParam)
      self.lora_scale = lora.scale
      self.lora_dropout = lora.dropout

  def __call__(self, x, rng: jax.Array | None = None):
    y = jnp.dot(x, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_scale is not None:
      xa = dropout(x, self.lora_dropout, rng).astype(jnp.float32) @ self.lora_a[...]
      y = y + ((xa @ self.lora_b[...]) * self.lora_scale).astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token (or position) embedding table [V, D]; also the tied LM head.

  `special` (None, or a [S, D] parameter set by the owner) replaces the table's last S rows in
  every lookup and in `attend`, so those rows can train while the table stays frozen.
  """

  def __init__(
    self,
    num: int,
    dim: int,
    *,
    axes: tuple[str, str],
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    init_std: float = 0.02,
  ):
    self.dtype = dtype
    self.embedding = param(
      init_std * jax.random.normal(rngs.params(), (num, dim), param_dtype), axes
    )
    self.special = nnx.data(None)  # a [S, D] Param when set by the owner

  def rows(self, ids):
    """Table rows of `ids` in the parameter dtype, with the special rows written in."""
    x = jnp.take(self.embedding[...], ids, axis=0)
    if self.special is None:
      return x
    S, V = self.special.shape[0], self.embedding.shape[0]
    tail = jnp.take(self.special[...], jnp.clip(ids - (V - S), 0, S - 1), axis=0)
    return jnp.where((ids >= V - S)[..., None], tail.astype(x.dtype), x)

  def __call__(self, ids):
    return self.rows(ids).astype(self.dtype)

  def table(self):
    """The effective [V, D] table (special rows written in), e.g. for export."""
    table = self.embedding[...]
    if self.special is None:
      return table
    return table.at[-self.special.shape[0] :].set(self.special[...].astype(table.dtype))

  def attend(self, h):
    """Logits against the table: h [..., D] -> [..., V], accumulated in f32."""
    logits = jnp.einsum(
      "...d,vd->...v",
      h,
      self.embedding[...].astype(self.dtype),
      preferred_element_type=jnp.float32,
    )
    if self.special is None:
      return logits
    tail = jnp.einsum(
      "...d,sd->...s", h, self.special[...].astype(self.dtype), preferred_element_type=jnp.float32
    )
    return logits.at[..., -self.special.shape[0] :].set(tail)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed in f32."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
    self.eps, self.dtype = eps, dtype
    self.scale = param(jnp.ones((dim,), param_dtype), ("embed",))
    self.bias = param(jnp.zeros((dim,), param_dtype), ("embed",))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(
      self.dtype
    )


class RMSNorm(nnx.Module):
  """RMSNorm as HF Llama: normalise in f32, cast back, then scale."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
    self.eps, self.dtype = eps, dtype
    self.scale = param(jnp.ones((dim,), param_dtype), ("embed",))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
  """Inverse frequencies [Dh/2], with HF's llama3 or linear scaling."""
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv
  if scaling.rope_type == "linear":
    return inv / scaling.factor
  low_wl = scaling.original_max_position_embeddings / scaling.low_freq_factor
  high_wl = scaling.original_max_position_embeddings / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv
  inv_l = jnp.where(wavelen > low_wl, inv / scaling.factor, inv)
  smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
    scaling.high_freq_factor - scaling.low_freq_factor
  )
  smoothed = (1 - smooth) * inv_l / scaling.factor + smooth * inv_l
  medium = (wavelen >= high_wl) & (wavelen <= low_wl)
  return jnp.where(medium, smoothed, inv_l)


def rope_tables(pos_BxL, inv_freq, dtype):
  """cos/sin [B, L, 1, Dh] for rotate-half RoPE; angles in f32, cast to the compute dtype like HF."""
  ang_BxLxF = pos_BxL.astype(jnp.float32)[..., None] * inv_freq
  ang = jnp.concatenate([ang_BxLxF, ang_BxLxF], -1)[:, :, None, :]
  return jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)


def rope(x_BxLxHxDh, cos_sin):
  """Applies rotate-half RoPE (HF convention) with tables from `rope_tables`."""
  cos, sin = cos_sin
  x1, x2 = jnp.split(x_BxLxHxDh, 2, axis=-1)
  return x_BxLxHxDh * cos + jnp.concatenate([-x2, x1], -1) * sin


def cudnn_fits(q_BxLxHxDh) -> bool:
  """Whether cuDNN's fused attention takes this query: a GPU backend, bf16/fp16, a head size that is
  a multiple of 8 up to 128 (jax's limit before Hopper; Hopper takes 256)."""
  Dh = q_BxLxHxDh.shape[-1]
  return (
    jax.default_backend() == "gpu"
    and q_BxLxHxDh.dtype in (jnp.bfloat16, jnp.float16)
    and Dh % 8 == 0
    and Dh <= 128
  )


def _pad_even(x, axis: int):
  """x with one zero (False) row appended on `axis` if its length there is odd."""
  if x.shape[axis] % 2 == 0:
    return x
  return jnp.pad(x, [(0, int(i == axis)) for i in range(x.ndim)])


def attention(
  q_BxLxHxDh,
  k_BxTxKxDh,
  v_BxTxKxDh,
  allowed_BxLxT,
  *,
  attn_dropout: float = 0.0,
  rng: jax.Array | None = None,
  impl: AttentionImpl = "xla",
):
  """Scaled dot-product GQA attention with a boolean mask; softmax in f32.

  Fully masked query rows (padding) get a uniform, finite distribution instead of NaN.
  impl "dot_product" calls jax.nn.dot_product_attention (implementation=None: jax picks the kernel;
  jax 0.10.2 picks XLA), except under attention dropout, which it lacks (the einsum path runs).
  impl "cudnn" asks it for cuDNN's fused kernel where `cudnn_fits`, else runs as "dot_product".
  """
  B, L, H, Dh = q_BxLxHxDh.shape
  T, K = k_BxTxKxDh.shape[1:3]
  G = H // K
  if impl != "xla" and (attn_dropout == 0.0 or rng is None):
    # A fully masked row attends uniformly over all T keys, as below: its query is zeroed (equal
    # scores) and every key unmasked, so no kernel sees an all-masked row.
    no_key_BxL = ~jnp.any(allowed_BxLxT, axis=-1)
    q_BxLxHxDh = jnp.where(no_key_BxL[:, :, None, None], 0, q_BxLxHxDh).astype(k_BxTxKxDh.dtype)
    allowed_BxLxT = allowed_BxLxT | no_key_BxL[:, :, None]
    kernel = "cudnn" if impl == "cudnn" and cudnn_fits(q_BxLxHxDh) else None
    if kernel:  # cuDNN's masked backward takes even lengths: one more (fully masked) query / key
      q_BxLxHxDh = _pad_even(q_BxLxHxDh, 1)
      k_BxTxKxDh, v_BxTxKxDh = _pad_even(k_BxTxKxDh, 1), _pad_even(v_BxTxKxDh, 1)
      allowed_BxLxT = _pad_even(_pad_even(allowed_BxLxT, 1), 2)
    o_BxLxHxDh = jax.nn.dot_product_attention(
      q_BxLxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask=allowed_BxLxT[:, None], implementation=kernel
    )
    return o_BxLxHxDh[:, :L].reshape(B, L, H * Dh)
  if L == 1:  # decoding: leave the cache in place (a transpose would copy it every step)
    q = q_BxLxHxDh.reshape(B, L, K, G, Dh)
    s_BxKxGxLxT = jnp.einsum("blkgd,btkd->bkglt", q, k_BxTxKxDh, preferred_element_type=jnp.float32)
  else:  # prefill/training: [B*K] batched matmuls over contiguous operands run ~2x faster on XLA:CPU
    q = q_BxLxHxDh.reshape(B, L, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B * K, G * L, Dh)
    k = k_BxTxKxDh.transpose(0, 2, 1, 3).reshape(B * K, T, Dh)
    s = jnp.einsum("nqd,ntd->nqt", q, k, preferred_element_type=jnp.float32)
    s_BxKxGxLxT = s.reshape(B, K, G, L, T)
  s_BxKxGxLxT = s_BxKxGxLxT / math.sqrt(Dh)
  s_BxKxGxLxT = jnp.where(allowed_BxLxT[:, None, None], s_BxKxGxLxT, _NEG)
  p = jax.nn.softmax(s_BxKxGxLxT, axis=-1)
  p = dropout(p, attn_dropout, rng).astype(v_BxTxKxDh.dtype)
  if L == 1:
    o = jnp.einsum("bkglt,btkd->blkgd", p, v_BxTxKxDh)
    return o.reshape(B, L, H * Dh)
  v = v_BxTxKxDh.transpose(0, 2, 1, 3).reshape(B * K, T, Dh)
  o = jnp.einsum("nqt,ntd->nqd", p.reshape(B * K, G * L, T), v)
  return o.reshape(B, K, G, L, Dh).transpose(0, 3, 1, 2, 4).reshape(B, L, H * Dh)
