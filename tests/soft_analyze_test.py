"""soft_jax.analyze: JS divergence values, the js_probe on a K=1 soft input, ROUGE-L, randomness
monotonicity on a toy distribution, and every analysis CLI on a tiny saved model."""
# pylint: disable=invalid-name

from __future__ import annotations

import json
import math
import subprocess

import cli_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soft_jax import traces
from soft_jax.sampling import SamplerParams

PROG = "soft_jax.analyze"


# ---------------------------------------------------------------------------------------------
# JS divergence


def test_js_identical_is_zero():
  p = jax.nn.softmax(jax.random.normal(jax.random.key(0), (4, 50)), axis=-1)
  np.testing.assert_allclose(traces.js_divergence(p, p), 0.0, atol=1e-7)


@pytest.mark.parametrize(
  "p, q, want",
  [
    ([1.0, 0.0], [0.0, 1.0], math.log(2)),  # disjoint supports: the maximum
    (
      [0.5, 0.5],
      [1.0, 0.0],
      0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2)) + 0.5 * math.log(1 / 0.75),
    ),
    (
      [0.25, 0.25, 0.5],
      [0.5, 0.25, 0.25],
      0.25 * math.log(0.25 / 0.375) + 0.5 * math.log(0.5 / 0.375),
    ),
  ],
)
def test_js_known_values(p, q, want):
  assert float(traces.js_divergence(p, q)) == pytest.approx(want, abs=1e-6)
  assert float(traces.js_divergence(q, p)) == pytest.approx(want, abs=1e-6)  # symmetric


# ---------------------------------------------------------------------------------------------
# ROUGE-L


@pytest.mark.parametrize(
  "cand, ref, lcs, f1",
  [
    ([1, 2, 3], [1, 2, 3], 3, 1.0),
    ([1, 2, 3], [4, 5], 0, 0.0),
    ([], [1], 0, 0.0),
    ([1, 2, 3, 4], [1, 3, 4], 3, 2 * (3 / 4) * 1.0 / (3 / 4 + 1.0)),
    ([7, 1, 8, 2, 9, 3], [1, 2, 3], 3, 2 * 0.5 * 1.0 / 1.5),
    (list("ABCBDAB"), list("BDCABA"), 4, 2 * (4 / 7) * (4 / 6) / (4 / 7 + 4 / 6)),
  ],
)
def test_rouge_l_table(cand, ref, lcs, f1):
  assert traces.lcs_length(cand, ref) == lcs
  assert traces.rouge_l(cand, ref)["f1"] == pytest.approx(f1)


# ---------------------------------------------------------------------------------------------
# randomness / softness


def test_randomness_monotone_on_toy():
  top_z = jnp.asarray([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0]] * 4)
  params = SamplerParams(mode="soft", temperature=1.0, top_k=8, top_p=1.0, min_p=0.0, max_topk=4)
  keys = jax.random.split(jax.random.key(0), 64)

  def stats(noise, v):
    r, s = traces.noise_randomness(keys, top_z, params, noise=noise, value=v)
    return float(jnp.mean(r)), float(jnp.mean(s))

  dirichlet = [stats("dirichlet", g) for g in (0.1, 1.0, 10.0, 1000.0)]
  rnd, soft = zip(*dirichlet)
  assert list(rnd) == sorted(rnd, reverse=True), rnd  # larger gamma: closer to st
  assert list(soft) == sorted(soft), soft  # larger gamma: softer
  assert rnd[-1] < 0.01  # gamma -> inf recovers the vanilla concept token
  gumbel = [stats("gumbel", t) for t in (0.1, 0.5, 1.0, 5.0)]
  assert [s for _, s in gumbel] == sorted(s for _, s in gumbel)  # larger tau: softer
  assert gumbel[-1][1] < math.log(4) + 1e-5  # at most K entries
  # The reference's metric (softmax of st' first) differs from JS on probabilities.
  r_legacy, _ = traces.noise_randomness(
    keys, top_z, params, noise="dirichlet", value=1000.0, legacy_softmax=True
  )
  assert float(jnp.mean(r_legacy)) > 0.05


# ---------------------------------------------------------------------------------------------
# js_probe / logit_lens on a tiny random model


@pytest.fixture(scope="module")
def tiny_model():
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from codi_jax.models import config as mcfg  # pylint: disable=import-outside-toplevel
  from codi_jax.models import transformer  # pylint: disable=import-outside-toplevel

  m = transformer.build(
    mcfg.tiny("llama", vocab_size=64, dtype="float32", param_dtype="float32"), seed=0
  )
  nnx.update(m, jax.tree.map(lambda x: x * 6.0, nnx.state(m, nnx.Param)))
  return m


IDS = jnp.asarray([[0, 3, 4, 5, 6], [7, 8, 9, 10, 11]], jnp.int32)
MASK = jnp.asarray([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], bool)


def test_js_probe_one_hot_soft_input(tiny_model):
  # K = 1: the soft input is exactly the top-1 embedding, so JS(P1, Pst) = 0 and P2 = P1.
  params = SamplerParams(mode="soft", max_topk=1, top_k=10, after_top_k=10)
  rec = jax.jit(lambda p, i, m, k: traces.js_probe_trace(tiny_model, p, i, m, k, steps=6))(
    params, IDS, MASK, jax.random.key(0)
  )
  assert rec["js"].shape == (2, 6, 3)
  np.testing.assert_allclose(rec["js"], 0.0, atol=1e-6)


def test_js_probe_soft_input_differs(tiny_model):
  params = SamplerParams(
    mode="soft", max_topk=4, top_k=10, after_top_k=10, temperature=1.0, top_p=1.0, min_p=0.0
  )
  rec = traces.js_probe_trace(tiny_model, params, IDS, MASK, jax.random.key(0), steps=6)
  js = np.asarray(rec["js"])
  assert js.min() >= 0 and js.max() <= math.log(2) + 1e-6
  assert js[..., 1].mean() > 0  # a real mixture: the top-2 counterfactual differs
  assert rec["top_z"].shape == (2, 6, 10)
  # The trace follows the soft input: same trace as SoftDecoder's soft mode (no stops).
  from soft_jax.decode import SoftDecoder  # pylint: disable=import-outside-toplevel

  dec = SoftDecoder(tiny_model, params.replace(cold_stop_entropy=0.0), pad_id=0, eos_ids=[-1])
  out = dec([[3, 4, 5, 6], [7, 8, 9, 10, 11]], max_new_tokens=6, length_bucket=5)
  assert [o.tokens for o in out] == np.asarray(rec["token"]).tolist()


def test_logit_lens_shapes(tiny_model):
  rec = traces.logit_lens_trace(tiny_model, IDS, MASK, 0.6, steps=3)
  L = tiny_model.cfg.num_layers
  assert rec["overlap"].shape == (2, 3, L + 1, 2)
  ov = np.asarray(rec["overlap"])
  assert ov.min() >= 0 and ov.max() <= 1
  # alpha = 1: the mixture is t1 itself, its top-10 holds t1's top-5 at every layer.
  rec1 = traces.logit_lens_trace(tiny_model, IDS, MASK, 1.0, steps=2)
  np.testing.assert_allclose(np.asarray(rec1["overlap"])[..., 0], 1.0)


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
  from soft_evaluate_test import make_tiny_dir  # pylint: disable=import-outside-toplevel

  return make_tiny_dir(str(tmp_path_factory.mktemp("tiny_llama")))


def run_cli(tmp_path, *args, timeout=600) -> subprocess.CompletedProcess:
  return cli_util.run_module(PROG, tmp_path, *args, timeout=timeout)


@pytest.mark.parametrize(
  "name, extra",
  [
    ("js_probe", []),
    ("logit_lens", ["--lens_min_p2=0.0"]),
    ("rouge", ["--rouge_modes=soft,gumbel", "--n_samples=2"]),
    ("randomness", ["--gammas=1,4", "--taus=0.5,1", "--draws=2"]),
  ],
)
def test_cli_writes_files(tmp_path, tiny_dir, name, extra):
  out = tmp_path / "out"
  proc = run_cli(
    tmp_path,
    name,
    f"--model={tiny_dir}",
    "--prompt=w7 w8 w9",
    "--prompt=w20",
    "--steps=3",
    "--max_new_tokens=4",
    "--max_topk=4",
    "--top_k=20",
    "--after_top_k=20",
    f"--out={out}",
    *extra,
  )
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  for ext in ("csv", "json", "png"):
    assert (out / f"{name}.{ext}").stat().st_size > 0
  summary = json.loads((out / f"{name}.json").read_text())
  assert summary["analysis"] == name


def test_cli_unknown_analysis(tmp_path):
  proc = run_cli(tmp_path, "nope", f"--out={tmp_path}")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0].startswith(f"{PROG}: error: ") and "js_probe" in lines[0]
