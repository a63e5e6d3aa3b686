"""Scan over layers: the stacked layout computes what the unrolled one does, and does not unroll.

Both layouts are built from one seed (the same initial values: blocks are created one by one, then
stacked), so outputs, CODI losses and gradients are compared directly; gradients are compared per
layer through `layout.per_layer`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codi_jax.codi import convert
from codi_jax.codi.model import Codi, CodiOptions, codi_loss
from codi_jax.decoding import Generator
from codi_jax.models import config as mcfg
from codi_jax.models import hf, layout, transformer
from tests import tiny_codi

ARCHS = ["gpt2", "llama", "qwen2"]
# f32 on CPU: the scan changes XLA's fusion and summation order, nothing else.
FWD_TOL, GRAD_TOL = 2e-6, 2e-5


def _pair(arch, **overrides):
  """(unrolled, scanned) with the same values: LoRA B made non-zero in the unrolled model, then
  copied layer by layer into the stacked one (`layout.stacked_value`)."""
  lora = mcfg.LoRAConfig(rank=4, alpha=8.0, dropout=0.1)
  sizes = dict(num_layers=3, embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1, lora=lora)
  sizes.update(overrides)
  unrolled, scanned = (
    transformer.build(mcfg.tiny(arch, scan_layers=s, **sizes), seed=4) for s in (False, True)
  )
  for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(unrolled, nnx.LoRAParam))):
    if path[-1] == "lora_b":  # B starts at zero: make the adapters count
      var.set_value(0.05 * jax.random.normal(jax.random.key(i), var.get_value().shape))
  values = _per_layer(nnx.state(unrolled))
  for path, var in nnx.to_flat_state(nnx.state(scanned)):
    var.set_value(jnp.asarray(layout.stacked_value(path, sizes["num_layers"], values.pop)))
  assert not values
  return unrolled, scanned


def _per_layer(state) -> dict:
  return {p: np.asarray(v) for p, v in layout.per_layer(nnx.to_flat_state(state))}


def _assert_same_per_layer(a, b, tol):
  fa, fb = _per_layer(a), _per_layer(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], rtol=0, atol=tol, err_msg=str(k))


@pytest.mark.parametrize("arch", ARCHS)
def test_same_initial_values_in_both_layouts(arch):
  """Blocks are created one by one in either layout, so one seed gives the same values."""
  unrolled, scanned = (
    transformer.build(mcfg.tiny(arch, num_layers=3, scan_layers=s), seed=4) for s in (0, 1)
  )
  assert isinstance(scanned.blocks, nnx.Module) and not isinstance(scanned.blocks, nnx.List)
  _assert_same_per_layer(nnx.state(unrolled), nnx.state(scanned), 0.0)
  specs = {
    p: v.get_metadata()["out_sharding"] for p, v in nnx.to_flat_state(nnx.state(scanned.blocks))
  }
  assert all(axes[0] == layout.LAYER_AXIS for axes in specs.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_hidden_states_and_remat_gradients_match(arch):
  unrolled, scanned = _pair(arch)
  ids = jax.random.randint(jax.random.key(0), (2, 9), 0, 128)
  mask = jnp.arange(9)[None] >= jnp.array([[0], [3]])  # a left-padded row
  pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
  kw = dict(positions=pos, mask=mask, hidden_states=True)
  ou, os_ = unrolled(ids, **kw), scanned(ids, **kw)
  np.testing.assert_allclose(ou.logits, os_.logits, rtol=0, atol=FWD_TOL)
  assert len(os_.hidden_states) == 4
  for a, b in zip(ou.hidden_states, os_.hidden_states):
    np.testing.assert_allclose(a, b, rtol=0, atol=FWD_TOL)

  def loss(model, remat):  # dropout on: the per-layer keys must match too
    out = model(ids, positions=pos, mask=mask, rng=jax.random.key(3), remat=remat)
    return jnp.mean(jax.nn.log_softmax(out.logits)[..., 5])

  for remat in (False, True):
    (lu, gu), (ls, gs) = (
      jax.value_and_grad(lambda s, g=graphdef, r=remat: loss(nnx.merge(g, s), r))(state)
      for graphdef, state in (nnx.split(unrolled), nnx.split(scanned))
    )
    np.testing.assert_allclose(lu, ls, rtol=0, atol=FWD_TOL)
    _assert_same_per_layer(gu, gs, GRAD_TOL)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_codi_loss_and_gradients_match(arch):
  """The whole CODI loss (teacher, encoder, thought scan with its cache, decoder, distillation on
  every layer), with dropout and both remat options on."""
  unrolled, scanned = _pair(arch)
  V = unrolled.cfg.vocab_size
  batch = tiny_codi.loss_batch(np.random.default_rng(2), V - 3, [6, 4, 5], [12, 10, 11], [9, 7, 8])
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  opts = CodiOptions(num_latent=3, remat_thoughts=True, remat_teacher=True)
  out = []
  for backbone in (unrolled, scanned):
    codi = Codi(backbone, rngs=nnx.Rngs(params=5))
    graphdef, state = nnx.split(codi)

    def f(s, graphdef=graphdef):
      return codi_loss(nnx.merge(graphdef, s), batch, opts, rng=jax.random.key(9))

    (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(state)
    out.append((loss, metrics, grads))
  (lu, mu, gu), (ls, ms, gs) = out
  np.testing.assert_allclose(lu, ls, rtol=0, atol=FWD_TOL)
  for k in mu:
    np.testing.assert_allclose(mu[k], ms[k], rtol=0, atol=FWD_TOL, err_msg=k)
  _assert_same_per_layer(gu, gs, GRAD_TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_identical(arch):
  unrolled, scanned = _pair(arch, embed_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
  prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
  runs = [
    Generator(m, 0, [127], min_capacity=8)(prompts, 24, length_bucket=4)
    for m in (
      unrolled,
      scanned,
    )
  ]
  assert runs[0] == runs[1]
  assert all(len(r) == 24 for r in runs[1])  # eos never drawn: every step compared


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_import_and_export_are_layout_free(arch):
  """`hf.assign` fills either layout from one set of HF tensors (LoRA init included) and
  `export_tensors` / `official_tensors` give back identical tensors."""
  unrolled, _ = _pair(arch)
  tensors = hf.export_tensors(unrolled)
  lora = mcfg.LoRAConfig(rank=4, alpha=8.0)
  cfgs = [mcfg.tiny(arch, num_layers=3, lora=lora, scan_layers=s) for s in (False, True)]
  models = [hf.assign(c, tensors, where="t", seed=1) for c in cfgs]
  _assert_same_per_layer(nnx.state(models[0]), nnx.state(models[1]), 0.0)
  for merge in (False, True):
    a, b = (hf.export_tensors(m, merge_lora=merge) for m in models)
    assert a.keys() == b.keys() == tensors.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  codis = [Codi(m, rngs=nnx.Rngs(params=0)) for m in models]
  a, b = (convert.official_tensors(c) for c in codis)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # ... and the official import reads them back into the stacked layout.
  back = convert._import(b, cfgs[1], "official", {})  # pylint: disable=protected-access
  _assert_same_per_layer(nnx.state(back), nnx.state(codis[1]), 0.0)


def _dots(num_layers: int, scan: bool) -> int:
  model = transformer.build(mcfg.tiny("llama", num_layers=num_layers, scan_layers=scan), seed=0)
  graphdef, state = nnx.split(model)
  ids = jnp.zeros((2, 8), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))

  def loss(s):
    return nnx.merge(graphdef, s)(ids, positions=pos).logits.sum()

  return jax.jit(jax.grad(loss)).lower(state).as_text().count("dot_general")


def test_scanned_program_does_not_grow_with_depth():
  """The compiled program holds one block whatever the depth (counted in the lowered module);
  the unrolled one holds one per layer."""
  assert _dots(2, scan=True) == _dots(8, scan=True)
  assert _dots(8, scan=False) > 3 * _dots(2, scan=False) // 2
