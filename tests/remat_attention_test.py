"""Memory and speed options: remat of the teacher pass and the thought scan (policies), and the
jax.nn.dot_product_attention path. Both change how values are computed, never which (f32)."""
# pylint: disable=invalid-name

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny_codi
import tiny_hf
from flax import nnx

from codi_jax import train_options as cs
from codi_jax.codi import build
from codi_jax.codi.model import Codi, CodiOptions, codi_loss
from codi_jax.errors import InputError
from codi_jax.models import cache as kvc
from codi_jax.models import config as mcfg
from codi_jax.models import loader, transformer
from codi_jax.models.layers import attention, checkpoint

POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
REMAT_TOL = 1e-6
ATTN_TOL = 1e-5
V = 96


def _model(arch, impl="xla", scale=10.0, **overrides):
  """A tiny model; matrices scaled from the 0.02 init (std ~0.2 by default), so that attention is
  far from uniform."""
  cfg = mcfg.tiny(arch, **{"vocab_size": V, "num_layers": 3, **overrides}, attention_impl=impl)
  model = transformer.build(cfg, seed=0)
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p: p * scale if p.ndim == 2 else p, state))
  return model


def _left_padded(rng, B=3, L=12, lens=(12, 7, 3)):
  ids = rng.integers(0, V, (B, L))
  mask = np.arange(L)[None] >= L - np.array(lens)[:, None]
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)


def _close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------------
# Attention implementations


@pytest.mark.parametrize("L", [1, 5])
def test_dot_product_attention_equals_einsum_path_with_fully_masked_rows(L):
  """GQA (4 heads on 2 kv heads); rows with no visible key attend uniformly in both paths."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(3, L, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 7, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(3, 7, 2, 8)), jnp.float32)
  allowed = rng.random((3, L, 7)) < 0.5
  allowed[0, 0] = False  # a fully masked query row
  allowed[2] = False  # a row whose every query is fully masked
  einsum = attention(q, k, v, jnp.asarray(allowed))
  fused = attention(q, k, v, jnp.asarray(allowed), impl="dot_product")
  _close(fused, einsum, ATTN_TOL)
  uniform = jnp.broadcast_to(v.mean(1)[:, None, :, None], (3, L, 2, 2, 8)).reshape(3, L, 32)
  _close(fused[2], uniform[2], ATTN_TOL)

  # Gradients agree too (a fully masked row gives its query no gradient in either path).
  def grads(impl):
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, allowed, impl=impl) ** 2)  # noqa: E731
    return jax.grad(loss, (0, 1, 2))(q, k, v)

  for ga, gb in zip(grads("xla"), grads("dot_product")):
    _close(gb, ga, ATTN_TOL)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_attention_impls_agree_on_a_left_padded_forward(arch):
  ids, mask, pos = _left_padded(np.random.default_rng(1))

  def forward(model):
    return jax.jit(lambda i: model(i, positions=pos, mask=mask, hidden_states=True))(ids)

  a, b = forward(_model(arch)), forward(_model(arch, "dot_product"))
  assert float(jnp.std(a.logits)) > 0.5  # far from a uniform-attention model
  _close(b.logits, a.logits, ATTN_TOL)  # every row, the left pads' fallback rows included
  assert len(a.hidden_states) == len(b.hidden_states) == 4
  for x, y in zip(a.hidden_states, b.hidden_states):
    _close(y, x, ATTN_TOL)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_attention_impls_agree_on_cached_step_decoding(arch):
  """Prefill 5 left-padded columns into a cache, then 7 one-position steps (pads included)."""
  ids, mask, pos = _left_padded(np.random.default_rng(2), lens=(12, 9, 6))
  P = 5

  def run(model):
    cache = kvc.init_cache(model.cfg, ids.shape[0], 16)
    pre = model(ids[:, :P], positions=pos[:, :P], mask=mask[:, :P], cache=cache)
    outs, cache = [pre.logits], pre.cache
    for t in range(P, ids.shape[1]):
      out = model(
        embeds=model.embed_tokens(ids[:, t : t + 1]),
        positions=pos[:, t : t + 1],
        mask=mask[:, t : t + 1],
        cache=cache,
        logits="last",
        hidden_states=True,
      )
      outs += [out.logits, *out.hidden_states]
      cache = out.cache
    return outs, cache

  (a, ca), (b, cb) = run(_model(arch)), run(_model(arch, "dot_product"))
  for x, y in zip(a, b):
    _close(y, x, ATTN_TOL)
  for x, y in zip(ca.k + ca.v, cb.k + cb.v):
    _close(y, x, ATTN_TOL)


def _codi(arch, impl, scale=10.0):
  return Codi(_model(arch, impl, scale), rngs=nnx.Rngs(1))


def _batch(rng, Lt=None):
  """Left-padded questions (lengths 8, 5, 3), right-padded decoder and teacher rows."""
  b = tiny_codi.loss_batch(rng, V, [8, 5, 3], [20, 14, 17], [15, 11, 13], teacher_width=Lt)
  return {k: jnp.asarray(v) for k, v in b.items()}


def _loss_and_grads(codi, opts, batch):
  graphdef, state = nnx.split(codi)

  def f(state):
    return jax.value_and_grad(
      lambda s: codi_loss(nnx.merge(graphdef, s), batch, opts), has_aux=True
    )(state)

  compiled = jax.jit(f).lower(state).compile()
  (loss, metrics), grads = compiled(state)
  return loss, metrics, grads, compiled.memory_analysis()


@pytest.mark.parametrize("arch, padding_mode", [("gpt2", "masked"), ("llama", "official")])
def test_codi_loss_equal_between_attention_impls(arch, padding_mode):
  batch = _batch(np.random.default_rng(3))
  opts = CodiOptions(num_latent=3, beta=2.0, gamma=0.5, padding_mode=padding_mode)
  _, ma, ga, _ = _loss_and_grads(_codi(arch, "xla"), opts, batch)
  _, mb, gb, _ = _loss_and_grads(_codi(arch, "dot_product"), opts, batch)
  for key in ("loss", "ce_student", "ce_teacher", "distill", "distill_per_layer"):
    _close(mb[key], ma[key], ATTN_TOL)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    _close(y, x, ATTN_TOL * max(1.0, float(jnp.max(jnp.abs(x)))))


def _fake_cudnn(monkeypatch) -> list[tuple[int, int]]:
  """A "gpu" backend whose cuDNN kernel is jax's XLA attention, refusing what cuDNN refuses under a
  mask in training (odd lengths) or at all (f32, a head size not a multiple of 8); returns the
  (L, T) of every call that reaches it."""
  calls = []
  real = jax.nn.dot_product_attention

  def fake(q, k, v, *, mask, implementation):
    if implementation == "cudnn":
      assert q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0, (q.shape, k.shape)
      assert q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0, q
      calls.append((q.shape[1], k.shape[1]))
      implementation = "xla"
    return real(q, k, v, mask=mask, implementation=implementation)

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  return calls


def _out_and_grads(impl, q, k, v, allowed, cot):
  out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, allowed, impl=impl), q, k, v)
  return [np.asarray(x, np.float32) for x in (out, *vjp(cot))]


@pytest.mark.parametrize("L, T", [(1, 7), (5, 7), (6, 8), (1, 16)])
def test_cudnn_pads_odd_lengths_and_equals_dot_product(monkeypatch, L, T):
  """bf16, fully masked rows included: outputs and gradients as dot_product's (bf16 rounding)."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(3, L, 4, 8)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.normal(size=(3, T, 2, 8)), jnp.bfloat16) for _ in range(2))
  cot = jnp.asarray(rng.normal(size=(3, L, 32)), jnp.bfloat16)
  allowed = rng.random((3, L, T)) < 0.5
  allowed[0, 0] = False  # a fully masked query row
  allowed[2] = False  # a row whose every query is fully masked
  args = (q, k, v, jnp.asarray(allowed), cot)
  ref = _out_and_grads("dot_product", *args)
  assert [x.shape for x in _out_and_grads("cudnn", *args)] == [x.shape for x in ref]  # cpu
  calls = _fake_cudnn(monkeypatch)
  got = _out_and_grads("cudnn", *args)
  assert calls == [(L + L % 2, T + T % 2)]
  for a, b in zip(got, ref):
    _close(a, b, 2e-2 * max(1.0, float(np.max(np.abs(b)))))


def test_cudnn_runs_as_dot_product_where_cudnn_does_not_fit(monkeypatch):
  calls = _fake_cudnn(monkeypatch)
  rng = np.random.default_rng(1)
  for dtype, Dh in ((jnp.float32, 8), (jnp.bfloat16, 12)):
    q = jnp.asarray(rng.normal(size=(2, 4, 2, Dh)), dtype)
    k = v = jnp.asarray(rng.normal(size=(2, 4, 2, Dh)), dtype)
    allowed = jnp.asarray(np.tril(np.ones((4, 4), bool))[None].repeat(2, 0))
    got = attention(q, k, v, allowed, impl="cudnn")
    _close(got.astype(jnp.float32), attention(q, k, v, allowed, impl="dot_product"), 0)
  assert calls == []


def test_cudnn_model_forward_matches_dot_product(monkeypatch):
  """A bf16 Llama through the fake kernel: every layer's attention goes to cuDNN (padded)."""
  ids, mask, pos = _left_padded(np.random.default_rng(6), L=11, lens=(11, 7, 3))

  def forward(impl):
    model = _model("llama", impl, dtype="bfloat16")
    return jax.jit(lambda i: model(i, positions=pos, mask=mask).logits)(ids)

  ref = forward("dot_product")
  calls = _fake_cudnn(monkeypatch)
  got = forward("cudnn")
  assert calls and set(calls) == {(12, 12)}, calls
  _close(got.astype(jnp.float32), ref.astype(jnp.float32), 0.05 * float(jnp.max(jnp.abs(ref))))


# ---------------------------------------------------------------------------------------------
# Remat


@functools.cache
def _reference(arch):
  """Loss, metrics, gradients and compiled memory without remat."""
  opts = CodiOptions(num_latent=3, beta=2.0, gamma=0.5)
  return _loss_and_grads(_codi(arch, "xla", 1.0), opts, _batch(np.random.default_rng(4)))


@pytest.mark.parametrize(
  "arch, policy", [("gpt2", "nothing_saveable")] + [("llama", policy) for policy in POLICIES]
)
def test_remat_gives_the_same_loss_and_gradients(arch, policy):
  """Teacher blocks and the thought scan rematerialised under each policy: values within 1e-6."""
  loss0, m0, g0, mem0 = _reference(arch)
  opts = CodiOptions(
    num_latent=3,
    beta=2.0,
    gamma=0.5,
    remat_teacher=True,
    remat_thoughts=True,
    remat_policy=policy,
  )
  loss, m, g, mem = _loss_and_grads(_codi(arch, "xla", 1.0), opts, _batch(np.random.default_rng(4)))
  _close(loss, loss0, REMAT_TOL)
  for key in ("ce_student", "ce_teacher", "distill"):
    _close(m[key], m0[key], REMAT_TOL)
  assert jax.tree.structure(g) == jax.tree.structure(g0)
  for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g)):
    _close(y, x, REMAT_TOL)
  print(f"{arch} {policy}: temp bytes {mem0.temp_size_in_bytes} -> {mem.temp_size_in_bytes}")


def test_remat_memory_of_the_compiled_step():
  """XLA's compiled temporaries with the teacher remat (a 6-layer teacher over 128 tokens) and with
  the thought-scan remat (12 thoughts). The scan's recomputation sits inside the loop, so it
  shrinks on every backend; XLA:CPU schedules the per-block recomputation of the unrolled teacher
  early, so its peak barely moves (measured 15.8 -> 15.5 MB here; on a 2-layer model it even grew,
  7.4 -> 8.3 MB), and that bound is asserted off CPU only."""
  codi = Codi(_model("llama", scale=1.0, num_layers=6), rngs=nnx.Rngs(1))
  batch = _batch(np.random.default_rng(5), Lt=128)
  teacher = dict(method="cot_sft", num_latent=0)
  _, _, _, off = _loss_and_grads(codi, CodiOptions(**teacher), batch)
  _, _, _, on = _loss_and_grads(codi, CodiOptions(**teacher, remat_teacher=True), batch)
  thoughts = dict(num_latent=12)
  _, _, _, s_off = _loss_and_grads(codi, CodiOptions(**thoughts), batch)
  _, _, _, s_on = _loss_and_grads(codi, CodiOptions(**thoughts, remat_thoughts=True), batch)
  print(
    f"teacher remat: temp {off.temp_size_in_bytes} -> {on.temp_size_in_bytes} bytes; "
    f"thought remat: {s_off.temp_size_in_bytes} -> {s_on.temp_size_in_bytes} bytes"
  )
  assert s_on.temp_size_in_bytes <= s_off.temp_size_in_bytes
  if jax.default_backend() != "cpu":
    assert on.temp_size_in_bytes <= off.temp_size_in_bytes


# ---------------------------------------------------------------------------------------------
# Options: defaults off, config plumbing, validation


def test_defaults_are_off_and_unchanged():
  from configs import base

  c = base.get_config()
  assert c.model.attention_impl == "xla"
  assert not c.codi.remat_teacher and not c.codi.remat_thoughts
  assert c.codi.remat_policy == "nothing_saveable"
  opts = CodiOptions()
  assert (opts.remat_teacher, opts.remat_thoughts, opts.remat_policy) == (
    False,
    False,
    "nothing_saveable",
  )
  assert mcfg.tiny("llama").attention_impl == "xla"


def test_config_reaches_the_model_and_the_options(tmp_path):
  c = tiny_codi.get_config()
  c.model.attention_impl = "dot_product"
  c.codi.update(remat_teacher=True, remat_thoughts=True, remat_policy="dots_saveable")
  cs.validate_train(c)
  opts = CodiOptions.from_config(c.codi)
  assert (opts.remat_teacher, opts.remat_thoughts, opts.remat_policy) == (
    True,
    True,
    "dots_saveable",
  )

  class Tok:
    vocab_size = 50

  scratch_config = build._scratch_config  # pylint: disable=protected-access
  assert scratch_config(c, Tok()).attention_impl == "dot_product"
  old = ml_collections.ConfigDict(c.to_dict())  # a run saved before the field existed
  del old.model.attention_impl
  assert scratch_config(old, Tok()).attention_impl == "xla"
  loaded = loader.load(tiny_hf.write(str(tmp_path / "m")), attention_impl="dot_product")
  assert loaded.model.cfg.attention_impl == "dot_product"
  assert loaded.model.blocks.cfg.attention_impl == "dot_product"  # the stacked block's config


@pytest.mark.parametrize(
  "path, value",
  [
    ("model.attention_impl", "flash"),
    ("codi.remat_policy", "everything"),
    ("codi.remat_teacher", 2),
  ],
)
def test_bad_values_are_refused(path, value):
  c = tiny_codi.get_config().to_dict()
  group, field = path.split(".")
  c[group][field] = value
  with pytest.raises(InputError, match=f"^--config.{path}: got {value!r}; expected "):
    cs.validate_train(c)


def test_cudnn_config_needs_bf16_and_a_gpu():
  c = tiny_codi.get_config()
  c.model.attention_impl = "cudnn"
  with pytest.raises(InputError, match="^--config.model.dtype: got 'float32'; expected bfloat16"):
    cs.validate_train(c, platform="gpu")
  c.model.dtype = "bfloat16"
  with pytest.raises(
    InputError, match="^--config.model.attention_impl: got 'cudnn'; expected xla or dot_product "
  ):
    cs.validate_train(c, platform="cpu")
  cs.validate_train(c, platform="gpu")


def test_model_and_remat_refuse_unknown_names():
  with pytest.raises(ValueError, match="attention_impl"):
    mcfg.tiny("llama", attention_impl="flash")
  with pytest.raises(ValueError, match="remat policy"):
    checkpoint(lambda x: x, "everything")
