"""The fused LM head + CE equals head + token_ce: value and gradients (hidden states, LoRA, head
weights when they train), chunked or not; and it never builds the whole [B, N, V] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codi_jax.codi.model import token_ce
from codi_jax.models import config as mcfg
from codi_jax.models import head_ce, transformer
from codi_jax.models.params import split_trainable

B, N = 3, 7


def _model(arch="gpt2", lora=True, special=False):
  lora_cfg = mcfg.LoRAConfig(rank=4, alpha=8.0, dropout=0.0) if lora else None
  model = transformer.build(mcfg.tiny(arch, lora=lora_cfg))
  if special:  # pad/bot/eot rows as their own parameter (Codi train_special_embeddings)
    table = model.embed.embedding
    model.embed.special = nnx.Param(table[...][-3:] + 0.5)
  return model


def _inputs(model):
  k1, k2 = jax.random.split(jax.random.key(0))
  ids = jax.random.randint(k1, (B, N), 0, model.cfg.vocab_size)
  labels = jax.random.randint(k2, (B, N), -3, model.cfg.vocab_size)  # about 2% ignored
  labels = labels.at[0, :2].set(-100).at[:, -1].set(model.cfg.vocab_size - 1)  # a special row
  return ids, labels


def _loss(fused: bool, chunk: int):
  def loss(trainable, frozen, graphdef, ids, labels):
    model = nnx.merge(graphdef, trainable, frozen)
    h = model(ids, positions=jnp.broadcast_to(jnp.arange(N), ids.shape), logits="none").hidden
    if fused:
      return head_ce.head_token_ce(model, h, labels, chunk)
    return token_ce(model.head(h), labels)

  return loss


def _split(model, lora: bool, special: bool):
  """LoRA only; LoRA + the special rows; or every parameter (the table trains)."""
  if not lora:
    return nnx.split(model, nnx.Param, ...)
  return split_trainable(model, extra=("special",) if special else ())


@pytest.mark.parametrize(
  "lora,special,arch,chunk",
  [
    (True, False, "gpt2", 0),  # the unfused path
    (True, False, "gpt2", 128 * B),  # one position per chunk
    (True, True, "gpt2", 2 * 128 * B),  # LoRA + special rows, two positions (a padded last chunk)
    (False, False, "gpt2", 10**9),  # the whole table trains, one chunk
    (False, False, "llama", 128 * B),  # untied LM head
  ],
)
def test_matches_head_then_token_ce(lora, special, arch, chunk):
  model = _model(arch, lora, special)
  ids, labels = _inputs(model)
  graphdef, trainable, frozen = _split(model, lora, special)
  args = (frozen, graphdef, ids, labels)
  want, want_g = jax.value_and_grad(_loss(False, 0))(trainable, *args)
  got, got_g = jax.jit(jax.value_and_grad(_loss(True, chunk)), static_argnums=2)(trainable, *args)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  flat_w, flat_g = nnx.to_flat_state(want_g), dict(nnx.to_flat_state(got_g))
  assert len(flat_w) == len(flat_g) and len(flat_w) > 0
  for path, w in flat_w:
    np.testing.assert_allclose(
      np.asarray(flat_g[path].get_value()), np.asarray(w.get_value()), rtol=2e-5, atol=1e-7,
      err_msg=str(path),
    )  # fmt: skip


def _dot_shapes(fn, *args) -> list:
  """Output shapes of every dot_general in fn's jaxpr, sub-jaxprs (scan bodies) included."""
  shapes = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        shapes.append(tuple(eqn.outvars[0].aval.shape))
      for p in eqn.params.values():
        for sub in p if isinstance(p, (tuple, list)) else (p,):
          if hasattr(sub, "jaxpr"):  # a ClosedJaxpr (scan, jit, custom_vjp)
            walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub)
          elif hasattr(sub, "eqns"):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes


def test_chunks_and_no_table_gradient_when_frozen():
  """One position per chunk: no [B, N, V] array in the compiled gradient, only [B, 1, V] ones;
  a frozen table gets no [V, D] gradient product, a trained one does."""
  model = _model()
  V, D = model.cfg.vocab_size, model.cfg.d_model
  ids, labels = _inputs(model)
  grad = jax.grad(_loss(True, V))  # B rows (one position) a chunk
  for extra, table_grad in (((), False), (("embed",), True)):
    graphdef, trainable, frozen = split_trainable(model, extra=extra)
    args = (trainable, frozen, graphdef, ids, labels)
    dots = _dot_shapes(lambda t, f, g=graphdef: grad(t, f, g, ids, labels), trainable, frozen)
    assert any(s[-1] == V for s in dots) and all(s[-2:] != (N, V) for s in dots)
    assert ((V, D) in dots) == table_grad, dots
    if not table_grad:
      hlo = jax.jit(grad, static_argnums=2).lower(*args).compile().as_text()
      assert f"f32[{B},1,{V}]" in hlo and f"f32[{B},{N},{V}]" not in hlo


def test_bf16_compute_keeps_gradient_dtypes():
  """Under bf16 compute the cotangents keep their primal dtypes (the step's optimizer sees bf16
  hidden-state gradients as before) and agree with the unfused path to bf16 precision."""
  model = transformer.build(
    mcfg.tiny("gpt2", dtype="bfloat16", lora=mcfg.LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
  )
  ids, labels = _inputs(model)
  graphdef, trainable, frozen = split_trainable(model)
  args = (frozen, graphdef, ids, labels)
  want = jax.jit(jax.grad(_loss(False, 0)), static_argnums=2)(trainable, *args)
  got = jax.jit(jax.grad(_loss(True, 128 * B)), static_argnums=2)(trainable, *args)
  for (path, w), (_, g) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got)):
    assert g.get_value().dtype == w.get_value().dtype, path
    np.testing.assert_allclose(
      np.asarray(g.get_value(), np.float32), np.asarray(w.get_value(), np.float32),
      rtol=0.05, atol=1e-2 * float(jnp.abs(w.get_value()).max()), err_msg=str(path),
    )  # fmt: skip
