"""soft_jax.sampling: filter order, entropy, Dirichlet/Gumbel statistics, answer phase, mixing, checks."""
# pylint: disable=invalid-name

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.errors import InputError
from soft_jax import sampling
from soft_jax.sampling import SamplerParams

P5 = np.array([0.4, 0.3, 0.15, 0.1, 0.05])  # a hand-made distribution, already sorted
Z5 = np.log(P5)[None].astype(np.float32)


# One jitted entry point, and few distinct shapes and static fields (mode, top-k sizes, K): on a
# busy CPU each compile of a sampler costs seconds, while float knobs are traced and free to vary.
sample_step = jax.jit(sampling.sample_step)
N_STAT = 4096  # rows of the statistical tests
STATIC = {"top_k": 30, "max_topk": 4, "after_top_k": 4}


def params_for(mode, **kw):
  return SamplerParams(mode=mode, **{**STATIC, **kw})


def stat_logits(seed, scale):
  """[N_STAT, 64]: one random row of logits, repeated."""
  z = (np.random.default_rng(seed).normal(size=(1, 64)) * scale).astype(np.float32)
  return z, jnp.asarray(np.repeat(z, N_STAT, 0))


def keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def ref_filter(z, T, top_k, top_p, min_p):
  """The reference on the full vocabulary (spec 2.1-2.3): softmax(z/T), top-k, top-p, min-p."""
  if T == 0:
    q = np.zeros_like(z, np.float64)
    q[np.argmax(z)] = 1
    return q
  x = z.astype(np.float64) / T
  p = np.exp(x - x.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  if top_k:
    p[order[top_k:]] = 0
    p /= p.sum()
  ps = p[order]
  excl = np.cumsum(ps) - ps
  p[order[(excl >= top_p) & (top_p < 1)]] = 0
  p /= p.sum()
  p[p < min_p * p.max()] = 0
  return p / p.sum()


def scatter(idx, q, V):
  out = np.zeros((idx.shape[0], V))
  np.add.at(out, (np.arange(idx.shape[0])[:, None], idx), q)
  return out


# ---------------------------------------------------------------------------------------------
# Filters: temperature first, then top-k, top-p, min-p, each renormalised


@pytest.mark.parametrize(
  "T, top_k, top_p, min_p, want",
  [
    (1.0, 0, 1.0, 0.0, P5),
    (1.0, 2, 1.0, 0.0, [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0]),
    # top-p keeps up to and including the token whose cumulative mass reaches top_p.
    (1.0, 0, 0.7, 0.0, [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0]),
    (1.0, 0, 0.71, 0.0, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0]),
    # min-p drops q < min_p * max q.
    (1.0, 0, 1.0, 0.3, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0]),
    # top-k renormalises before top-p: on [.47, .35, .18] top_p=.8 keeps 2, not the 3 it
    # would keep on the unfiltered p.
    (1.0, 3, 0.8, 0.0, [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0]),
    # top-p before min-p keeps 3 here; min-p first (then top-p) would keep 2.
    (1.0, 0, 0.8, 0.3, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0]),
    # temperature before the filters: T=0.5 squares and renormalises p, then top-p=0.8 keeps 2.
    (0.5, 0, 0.8, 0.0, [0.16 / 0.25, 0.09 / 0.25, 0, 0, 0]),
    (0.0, 30, 0.95, 0.0, [1, 0, 0, 0, 0]),
  ],
)
def test_filter_order_table(T, top_k, top_p, min_p, want):
  idx, q = sampling.filter_logits(jnp.asarray(Z5), T, top_k, top_p, min_p, 5)
  got = scatter(np.asarray(idx), np.asarray(q), 5)[0]
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got, ref_filter(Z5[0], T, top_k, top_p, min_p), atol=1e-6)


def test_filter_matches_full_vocab_reference_on_random_logits():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(6, 50)).astype(np.float32) * 3
  for T, top_k, top_p, min_p in [
    (0.6, 30, 0.95, 0.001),
    (1.3, 10, 0.5, 0.0),
    (0.6, 30, 1.0, 0.2),
    (2.0, 0, 0.9, 0.05),
    (0.1, 5, 0.99, 0.0),
  ]:
    k_max = top_k or 50
    idx, q = sampling.filter_logits(jnp.asarray(z), T, top_k, top_p, min_p, k_max)
    got = scatter(np.asarray(idx), np.asarray(q), 50)
    want = np.stack([ref_filter(r, T, top_k, top_p, min_p) for r in z])
    np.testing.assert_allclose(got, want, atol=2e-6, err_msg=str((T, top_k, top_p, min_p)))
    # The support is a prefix of the candidates (sorted by descending probability).
    qs = np.asarray(q)
    assert np.all(np.diff((qs > 0).astype(int), axis=1) <= 0)
    assert np.all(np.diff(qs, axis=1) <= 1e-7)


def test_entropy_is_on_the_full_unfiltered_distribution():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(3, 40)).astype(np.float32)
  p = np.exp(z / 0.6 - (z / 0.6).max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  want = -(p * np.log(p)).sum(1)
  np.testing.assert_allclose(np.asarray(sampling.entropy(jnp.asarray(z), 0.6)), want, rtol=1e-5)
  np.testing.assert_allclose(
    np.asarray(sampling.entropy(jnp.asarray(z), 0.6, normalized=True)),
    want / math.log(40),
    rtol=1e-5,
  )
  np.testing.assert_array_equal(np.asarray(sampling.entropy(jnp.asarray(z), 0.0)), 0.0)
  # A step whose top-p support is a single token still has the full distribution's entropy.
  params = SamplerParams(top_p=0.01, cold_stop_entropy=0.0)
  s = sample_step(params, jnp.asarray(z), keys(3), jnp.ones(3, bool))
  np.testing.assert_allclose(np.asarray(s.entropy), want, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(s.w)[:, 0], 1.0)


# ---------------------------------------------------------------------------------------------
# Concept tokens


def test_soft_concept_token_is_the_renormalised_top_k():
  params = SamplerParams(mode="soft", temperature=1.0, top_k=5, top_p=1.0, min_p=0.0, max_topk=3)
  s = sample_step(params, jnp.asarray(Z5), keys(1), jnp.ones(1, bool))
  np.testing.assert_array_equal(np.asarray(s.idx), [[0, 1, 2]])
  np.testing.assert_allclose(np.asarray(s.w), [[0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85]], atol=1e-6)
  assert int(s.token[0]) == 0


def test_short_support_keeps_valid_ids_with_zero_weight():
  params = SamplerParams(mode="soft", temperature=1.0, top_p=0.5, min_p=0.0, max_topk=4, top_k=5)
  s = sample_step(params, jnp.asarray(Z5), keys(1), jnp.ones(1, bool))
  np.testing.assert_allclose(np.asarray(s.w), [[0.4 / 0.7, 0.3 / 0.7, 0, 0]], atol=1e-6)
  assert set(np.asarray(s.idx)[0].tolist()) <= set(range(5))


def test_dirichlet_draws_average_to_q_and_stay_on_the_support():
  _, zz = stat_logits(2, 2.0)
  n, alpha = N_STAT, 4.0
  idx, q = sampling.filter_logits(zz, 0.6, 30, 0.95, 0.001, 30)
  draws = np.asarray(jax.jit(sampling.dirichlet_resample)(keys(n), q, alpha))
  q0 = np.asarray(q)[0]
  support = q0 > 1e-7
  assert 2 < support.sum() < 30
  assert np.all(draws[:, ~support] == 0)
  np.testing.assert_allclose(draws.sum(1), 1.0, atol=1e-5)
  # Mean of Dir(alpha q) is q; per-coordinate std of the mean is sqrt(q(1-q)/(alpha+1)/n) <= 0.0035.
  np.testing.assert_allclose(draws.mean(0), q0, atol=0.015)
  # The variance is Dir(alpha q)'s, q(1-q)/(alpha+1), on the large entries (small ones are too
  # heavy-tailed for a 4000-draw sample variance).
  big = q0 > 0.1
  np.testing.assert_allclose(draws.var(0)[big], (q0 * (1 - q0) / (alpha + 1))[big], rtol=0.15)
  # Through the full concept token: weights only on filtered-support ids.
  params = params_for("dirichlet", dirichlet_alpha=alpha)
  s = sample_step(params, zz, keys(n), jnp.ones(n, bool))
  allowed = set(np.asarray(idx)[0][support].tolist())
  w, ids = np.asarray(s.w), np.asarray(s.idx)
  assert set(ids[w > 0].tolist()) <= allowed
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
  assert np.all(np.diff(w, axis=1) <= 1e-7)
  np.testing.assert_array_equal(np.asarray(s.token), ids[:, 0])  # trace token = argmax of the draw


def test_dirichlet_tiny_concentration_has_no_nan():
  q = jnp.asarray([[0.999, 1e-4, 1e-5, 0.0]], jnp.float32).repeat(64, 0)
  d = np.asarray(sampling.dirichlet_resample(keys(64), q, 1e-3))
  assert np.all(np.isfinite(d)) and np.all(d[:, 3] == 0)
  np.testing.assert_allclose(d.sum(1), 1.0, atol=1e-5)


def test_gumbel_trace_tokens_follow_the_kept_weights():
  """Chi-square goodness of fit of idx[0] to pi (the renormalised top-K), fixed seed."""
  _, zz = stat_logits(3, 0.5)
  n = N_STAT
  params = params_for("gumbel", gumbel_tau=0.5, top_p=1.0, min_p=0.0)
  s = sample_step(params, zz, keys(n, seed=7), jnp.ones(n, bool))
  pi = sample_step(params.replace(mode="soft"), zz, keys(n), jnp.ones(n, bool))
  pi_idx, pi_w = np.asarray(pi.idx)[0], np.asarray(pi.w)[0]
  counts = np.array([(np.asarray(s.token) == t).sum() for t in pi_idx])
  assert counts.sum() == n  # never a token outside the kept K
  assert np.all(pi_w > 0.05)  # every category well populated: the chi-square approximation holds
  expected = n * pi_w
  chi2 = ((counts - expected) ** 2 / expected).sum()
  # df = 3: the 0.999 quantile of chi-square(3) is 16.27.
  assert chi2 < 16.27, (counts, expected)
  np.testing.assert_allclose(counts / n, pi_w, atol=0.025)  # ~3.5 standard errors
  w = np.asarray(s.w)
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
  assert np.all(np.diff(w, axis=1) <= 1e-7)  # re-sorted
  np.testing.assert_array_equal(np.asarray(s.token), np.asarray(s.idx)[:, 0])


def test_gumbel_keeps_zero_weights_zero():
  z, zz = stat_logits(9, 1.0)
  params = params_for("gumbel", temperature=1.0, top_p=0.3, min_p=0.0)
  support = np.nonzero(ref_filter(z[0], 1.0, 30, 0.3, 0.0))[0]
  assert 2 <= len(support) < 4  # fewer than K tokens survive top-p
  s = sample_step(params, zz, keys(N_STAT), jnp.ones(N_STAT, bool))
  w, ids = np.asarray(s.w), np.asarray(s.idx)
  assert set(ids[w > 0].tolist()) <= set(support.tolist())
  assert np.all((w > 0).sum(1) <= len(support))


def test_k1_and_zero_temperature_reduce_to_argmax():
  rng = np.random.default_rng(4)
  z = jnp.asarray(rng.normal(size=(8, 30)).astype(np.float32))
  for params in (
    SamplerParams(mode="soft", max_topk=1),
    SamplerParams(mode="soft", temperature=0.0),
    SamplerParams(mode="greedy"),
  ):
    s = sample_step(params, z, keys(8), jnp.ones(8, bool))
    np.testing.assert_array_equal(np.asarray(s.token), np.argmax(np.asarray(z), 1))
    if params.soft:
      np.testing.assert_array_equal(np.asarray(s.w)[:, 0], 1.0)


# ---------------------------------------------------------------------------------------------
# Answer phase


@pytest.mark.parametrize("mode", ["soft", "dirichlet", "gumbel", "sample"])
def test_answer_rows_sample_from_the_after_thinking_distribution(mode):
  z, zz = stat_logits(5, 2.0)
  n = N_STAT
  params = params_for(
    mode, temperature=0.0, after_temperature=1.5, after_top_p=1.0, after_min_p=0.0
  )
  think = jnp.arange(n) % 2 == 0
  s = jax.jit(sampling.sample_step)(params, zz, keys(n), think)
  tok = np.asarray(s.token)
  # Thinking rows: T = 0, so the argmax (noise-free for gumbel/dirichlet as q is one-hot).
  assert np.all(tok[0::2] == np.argmax(z[0]))
  # Answer rows: softmax(z / 1.5) over the top 4.
  want = ref_filter(z[0], 1.5, 4, 1.0, 0.0)
  freq = np.bincount(tok[1::2], minlength=64) / (n // 2)
  assert set(np.nonzero(freq)[0]) <= set(np.nonzero(want)[0])
  np.testing.assert_allclose(freq, want, atol=0.035)  # ~3.5 standard errors


def test_legacy_argmax_answers_with_the_thinking_path():
  _, zz = stat_logits(6, 1.0)
  params = params_for("gumbel", answer_phase="legacy_argmax", after_temperature=5.0)
  s = sample_step(params, zz, keys(N_STAT), jnp.zeros(N_STAT, bool))
  np.testing.assert_array_equal(np.asarray(s.token), np.asarray(s.idx)[:, 0])


def test_after_temperature_none_reuses_the_thinking_temperature():
  z, zz = stat_logits(10, 1.0)
  think = jnp.zeros(N_STAT, bool)
  a = sample_step(
    params_for("soft", temperature=0.0, after_temperature=None), zz, keys(N_STAT), think
  )
  assert np.all(np.asarray(a.token) == np.argmax(z[0]))
  b = sample_step(
    params_for("soft", temperature=0.0, after_temperature=2.0), zz, keys(N_STAT), think
  )
  assert len(set(np.asarray(b.token).tolist())) > 1


# ---------------------------------------------------------------------------------------------
# Embedding mixture


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mix_embeddings(dtype):
  rng = np.random.default_rng(7)
  table = jnp.asarray(rng.normal(size=(20, 8)), dtype)
  idx = jnp.asarray([[3, 5, 7], [2, 2, 2]], jnp.int32)
  w = jnp.asarray([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]], jnp.float32)
  e = sampling.mix_embeddings(table[idx], w, dtype)
  assert e.dtype == dtype and e.shape == (2, 8)
  t32 = np.asarray(table.astype(jnp.float32))
  want = 0.5 * t32[3] + 0.3 * t32[5] + 0.2 * t32[7]
  np.testing.assert_allclose(
    np.asarray(e[0], np.float32), want, atol=1e-6 if dtype == jnp.float32 else 2e-2
  )
  # One-hot is exactly the token's embedding.
  np.testing.assert_array_equal(np.asarray(e[1]), np.asarray(table[2]))
  # Model-dtype accumulation (the reference) is available.
  e2 = sampling.mix_embeddings(table[idx], w, dtype, accum_dtype=dtype)
  assert e2.dtype == dtype


def test_one_hot_input():
  idx, w = sampling.one_hot_input(jnp.asarray([4, 9], jnp.int32), 3)
  np.testing.assert_array_equal(np.asarray(idx), [[4, 4, 4], [9, 9, 9]])
  np.testing.assert_array_equal(np.asarray(w), [[1, 0, 0], [1, 0, 0]])


# ---------------------------------------------------------------------------------------------
# Determinism and validation


def test_same_keys_same_draws_different_keys_differ():
  _, z = stat_logits(8, 1.0)
  for mode in ("sample", "dirichlet", "gumbel"):
    params = params_for(mode, temperature=1.0, min_p=0.0)
    a = sample_step(params, z, keys(N_STAT, 0), jnp.ones(N_STAT, bool))
    b = sample_step(params, z, keys(N_STAT, 0), jnp.ones(N_STAT, bool))
    c = sample_step(params, z, keys(N_STAT, 1), jnp.ones(N_STAT, bool))
    np.testing.assert_array_equal(np.asarray(a.token), np.asarray(b.token))
    np.testing.assert_array_equal(np.asarray(a.w), np.asarray(b.w))
    assert not np.array_equal(np.asarray(a.w), np.asarray(c.w)) or mode == "sample"
    assert not np.array_equal(np.asarray(a.token), np.asarray(c.token))


@pytest.mark.parametrize(
  "kw, field",
  [
    ({"mode": "beam"}, "mode"),
    ({"max_topk": 31}, "max_topk"),
    ({"max_topk": 0}, "max_topk"),
    ({"temperature": -0.1}, "temperature"),
    ({"after_temperature": -1.0}, "after_temperature"),
    ({"dirichlet_alpha": 0.0}, "dirichlet_alpha"),
    ({"dirichlet_alpha": -2.0}, "dirichlet_alpha"),
    ({"gumbel_tau": 0.0}, "gumbel_tau"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"after_top_p": -0.5}, "after_top_p"),
    ({"min_p": 1.0}, "min_p"),
    ({"after_min_p": -0.1}, "after_min_p"),
    ({"top_k": -1}, "top_k"),
    ({"cold_stop_entropy": -1.0}, "cold_stop_entropy"),
    ({"cold_stop_patience": 0}, "cold_stop_patience"),
    ({"max_thinking_tokens": -3}, "max_thinking_tokens"),
    ({"answer_phase": "argmax"}, "answer_phase"),
    ({"embed_mix_dtype": "float16"}, "embed_mix_dtype"),
    ({"temperature": float("nan")}, "temperature"),
  ],
)
def test_validate_names_the_field(kw, field):
  with pytest.raises(InputError, match=f"^--{field}: "):
    SamplerParams(**kw).validate(prefix="--")


def test_validate_accepts_defaults_and_checks_vocab():
  SamplerParams().validate()
  SamplerParams(top_k=0, max_topk=50).validate()
  with pytest.raises(InputError, match="^max_topk: .*vocabulary"):
    SamplerParams(top_k=0, max_topk=50).validate(vocab=40)


def test_float_knobs_are_traced_and_shape_knobs_static():
  """Changing gamma/tau/T/... reuses the compiled function; K or the mode recompiles."""
  traces = []

  @jax.jit
  def f(params, z):
    traces.append(1)
    return sample_step(params, z, keys(2), jnp.ones(2, bool)).w

  z = jnp.asarray(np.repeat(Z5, 2, 0))
  f(SamplerParams(mode="gumbel", max_topk=3, top_k=5), z)
  f(
    SamplerParams(mode="gumbel", max_topk=3, top_k=5, gumbel_tau=0.9, temperature=1.1, top_p=0.5), z
  )
  assert len(traces) == 1
  f(SamplerParams(mode="gumbel", max_topk=2, top_k=5), z)
  assert len(traces) == 2
