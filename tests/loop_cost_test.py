"""hlo.loop_costs: XLA's cost analysis counts a while body once; corrected, every body counts its
trip count times, so a scanned-layer program's cost model counts what the unrolled one's does.
CPU compiles, counts only."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from codi_jax import hlo
from codi_jax.models import config as mcfg
from codi_jax.models import transformer

LAYERS, STEPS = 4, 3
# The two layouts are different programs: XLA fuses their elementwise work differently, and the
# unrolled backward drops a few matmuls that a loop body must keep (measured: the scanned program
# counts 1.6% more FLOPs here, 0.1-0.3% without the outer loop). Stated tolerance: 2%.
FLOP_TOL = 0.02


def _corrected(compiled) -> tuple[float, float, int]:
  """(XLA's FLOPs as reported, corrected by `loop_costs`, loops still counted once)."""
  raw = hlo.cost(compiled)["flops"]
  extra, once = hlo.loop_costs(compiled.as_text())
  return raw, raw + extra["flops"], once


def test_nested_scans_count_every_trip():
  """A matmul inside two nested scans (STEPS x LAYERS): exactly STEPS x LAYERS matmuls."""
  D, B = 64, 8

  def f(w_LxDxD, h_BxD):
    def layer(h, w):
      return jnp.tanh(h @ w), None

    def step(h, _):
      return jax.lax.scan(layer, h, w_LxDxD)[0], None

    return jax.lax.scan(step, h_BxD, None, length=STEPS)[0]

  args = jnp.ones((LAYERS, D, D)), jnp.ones((B, D))
  compiled = jax.jit(f).lower(*args).compile()
  raw, corrected, once = _corrected(compiled)
  matmuls = STEPS * LAYERS * 2 * B * D * D
  assert once == 0 and sorted(hlo.loop_trips(compiled.as_text())) == [STEPS, LAYERS]
  assert raw < matmuls / (STEPS * LAYERS) * 1.1  # XLA's own count: one matmul
  assert matmuls <= corrected <= matmuls * 1.01, (corrected, matmuls)  # + a few adds
  # A backend that counts twice the bytes of the generic analysis (TPU: padded tiles) gets its
  # loop bodies scaled the same way.
  text, own = compiled.as_text(), hlo.cost(compiled)
  extra, _ = hlo.loop_costs(text)
  scaled, _ = hlo.loop_costs(text, backend={**own, "bytes accessed": 2 * own["bytes accessed"]})
  assert scaled["bytes accessed"] == pytest.approx(2 * extra["bytes accessed"], rel=1e-6)
  assert scaled["flops"] == pytest.approx(extra["flops"], rel=1e-6)


def test_trip_count_read_off_a_condition_with_a_step():
  """libtpu's HLO states no trip counts (and its collective-matmul windows step by 2): without
  XLA:CPU's known_trip_count, `i < 8` from 0 by 2 is read as 4 trips and costed so."""
  D, B = 64, 8

  def f(w_DxD, h_BxD):
    def body(c):
      i, h = c
      return i + 2, jnp.tanh(h @ w_DxD)

    return jax.lax.while_loop(lambda c: c[0] < 8, body, (0, h_BxD))[1]

  text = jax.jit(f).lower(jnp.ones((D, D)), jnp.ones((B, D))).compile().as_text()
  assert '"known_trip_count":{"n":"4"}' in text
  text = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text)
  assert hlo.loop_trips(text) == [4]
  extra, once = hlo.loop_costs(text)
  assert once == 0 and extra["flops"] == pytest.approx(3 * 2 * B * D * D, rel=1e-3)


def _grad_program(scan_layers: bool):
  """Gradient of a loss that runs a tiny Llama STEPS times inside a scan (as CODI's thoughts do),
  on abstract weights."""
  cfg = mcfg.tiny("llama", num_layers=LAYERS, scan_layers=scan_layers, d_model=64, head_dim=16)
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: transformer.build(cfg)), nnx.Param, ...)

  def loss(params, ids_BxT):
    model = nnx.merge(graphdef, params, rest)
    pos_BxT = jnp.broadcast_to(jnp.arange(ids_BxT.shape[1]), ids_BxT.shape)

    def step(total, i):  # depends on i: XLA cannot hoist the model out of the loop
      logits = model(ids_BxT, positions=pos_BxT + i).logits
      return total + logits.astype(jnp.float32).mean(), None

    return jax.lax.scan(step, 0.0, jnp.arange(STEPS))[0]

  ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  return jax.jit(jax.grad(loss)).lower(params, ids).compile()


@pytest.mark.skipif(hlo.loop_costs("") is None, reason="jaxlib without HloCostAnalysis hooks")
def test_scanned_layers_cost_what_unrolled_layers_cost():
  scanned, unrolled = _grad_program(True), _grad_program(False)
  raw_s, flops_s, once_s = _corrected(scanned)
  _, flops_u, once_u = _corrected(unrolled)
  assert once_s == once_u == 0
  assert LAYERS in hlo.loop_trips(scanned.as_text())
  assert LAYERS not in hlo.loop_trips(unrolled.as_text())
  # Uncorrected, the scanned program counts one layer of four and one step of three.
  assert raw_s < flops_u / 4
  assert abs(flops_s - flops_u) <= FLOP_TOL * flops_u, (flops_s, flops_u)
