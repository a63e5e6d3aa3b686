"""LM head + token cross-entropy fused, a few positions at a time: the [B, N, V] logits never exist.

`token_ce(backbone.head(h), labels)` writes the logits, their exponentials and their gradient as
whole [B, N, V] arrays. On CPU those dominated a small training step's temporary memory (XLA
allocates temporaries per run, and blocks over glibc's 32 MiB mmap limit are page-faulted in anew
each step) and memory traffic. Here a `lax.scan` over position chunks of at most `chunk_logits`
logits computes each chunk's logits, log-sum-exp, and the gradient (softmax - onehot) pushed back
through the head, all in the forward pass (`custom_vjp`); the backward only scales what the forward
kept (dh [B, N, D], and head-parameter gradients when they train). Same values as the unfused path
up to float rounding; the head's FLOPs are unchanged (logits once, one product back).

Shape legend: B batch, N positions, D model, V vocab, C positions per chunk, K chunks.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.custom_derivatives import CustomVJPPrimal

# Logits computed at once by default: 4 Mi f32 = 16 MiB, under glibc's 32 MiB mmap limit (so the
# chunk buffers are reused, not faulted in per step) and a few L3-sized slices for the matmuls.
CHUNK_LOGITS = 1 << 22

_HEAD = nnx.Any(nnx.PathContains("embed"), nnx.PathContains("lm_head"))  # what `head` reads


def _chunk_nll(lg_BxCxV, labels_BxC):
  """(sum of nll over labels >= 0, d sum / d logits) of one chunk, in f32."""
  valid = labels_BxC >= 0
  label = jnp.maximum(labels_BxC, 0)
  m = jax.lax.stop_gradient(lg_BxCxV.max(-1, keepdims=True))
  e = jnp.exp(lg_BxCxV - m)
  s = e.sum(-1, keepdims=True)
  picked = jnp.take_along_axis(lg_BxCxV, label[..., None], -1)[..., 0]
  nll = jnp.log(s[..., 0]) + m[..., 0] - picked
  onehot = jnp.arange(lg_BxCxV.shape[-1]) == label[..., None]
  d_lg = jnp.where(valid[..., None], e / s - onehot, 0.0)
  return jnp.sum(jnp.where(valid, nll, 0.0)), d_lg


def head_token_ce(backbone, h_BxNxD, labels_BxN, chunk_logits: int = CHUNK_LOGITS):
  """Mean CE of `backbone.head(h)` against labels at the same index (labels < 0 ignored), as
  `token_ce` of those logits, without materializing them; chunk_logits <= 0: the unfused path."""
  valid = labels_BxN >= 0
  count = jnp.maximum(valid.sum(), 1)
  if chunk_logits <= 0:
    lg = backbone.head(h_BxNxD).astype(jnp.float32)
    return _chunk_nll(lg, labels_BxN)[0] / count
  B, N, D = h_BxNxD.shape
  C = max(1, min(N, chunk_logits // max(1, B * backbone.cfg.vocab_size)))
  K = -(-N // C)
  graphdef, head_state, rest = nnx.split(backbone, _HEAD, ...)

  def head(state, rest_state, h):
    return nnx.merge(graphdef, state, rest_state).head(h).astype(jnp.float32)

  h_KxBxCxD = jnp.pad(h_BxNxD, ((0, 0), (0, K * C - N), (0, 0))).reshape(B, K, C, D)
  h_KxBxCxD = h_KxBxCxD.transpose(1, 0, 2, 3)
  labels_KxBxC = jnp.pad(labels_BxN, ((0, 0), (0, K * C - N)), constant_values=-1)
  labels_KxBxC = labels_KxBxC.reshape(B, K, C).transpose(1, 0, 2)

  def scan(state, rest_state, h, trained):
    """(sum of nll, per-chunk dh [K, B, C, D], summed gradients of the `trained` head leaves)."""
    leaves, treedef = jax.tree.flatten(state)

    def chunk_head(trained_leaves, hc):
      it = iter(trained_leaves)
      full = [next(it) if t else v for v, t in zip(leaves, trained)]
      return head(jax.tree.unflatten(treedef, full), rest_state, hc)

    def body(d_trained, xs):
      hc, lc = xs
      own = [v for v, t in zip(leaves, trained) if t]
      lg, vjp = jax.vjp(chunk_head, own, hc)
      total, d_lg = _chunk_nll(lg, lc)
      d_own, dh = vjp(d_lg)
      return [a + b for a, b in zip(d_trained, d_own)], (total, dh)

    zeros = [jnp.zeros_like(v) for v, t in zip(leaves, trained) if t]
    d_trained, (totals, dh) = jax.lax.scan(body, zeros, (h, labels_KxBxC))
    return jnp.sum(totals), dh, d_trained

  @jax.custom_vjp
  def nll_sum(state, rest_state, h):
    # Not differentiated: XLA drops the unused dh products from the loop.
    return scan(state, rest_state, h, [False] * len(jax.tree.leaves(state)))[0]

  def fwd(state, rest_state, h):
    trained = [p.perturbed for p in jax.tree.leaves(state, is_leaf=_is_primal)]
    values = jax.tree.map(lambda p: p.value, state, is_leaf=_is_primal)
    rest_values = jax.tree.map(lambda p: p.value, rest_state, is_leaf=_is_primal)
    total, dh, d_trained = scan(values, rest_values, h.value, trained)
    it = iter(d_trained)
    return total, (dh, [next(it) if t else None for t in trained])  # None: a frozen leaf

  def bwd(res, g):
    dh, d_leaves = res
    scale = lambda d: None if d is None else (g * d).astype(d.dtype)  # noqa: E731  (bf16 stays)
    d_state = [scale(d) for d in d_leaves]
    return jax.tree.unflatten(jax.tree.structure(head_state), d_state), None, scale(dh)

  nll_sum.defvjp(fwd, bwd, symbolic_zeros=True)
  total = nll_sum(head_state, jax.lax.stop_gradient(rest), h_KxBxCxD)
  return total / count


def _is_primal(x) -> bool:
  return isinstance(x, CustomVJPPrimal)
