"""pass@k and dataset summaries for the soft-thinking evaluation."""

import itertools
import math

import pytest

from soft_jax import metrics


def _brute_force(n: int, c: int, k: int) -> float:
  """Fraction of the k-subsets of n samples (c correct) holding at least one correct sample."""
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_combinatorics(n):
  for c in range(n + 1):
    for k in range(1, n + 1):
      got = metrics.pass_at_k(n, c, k)
      assert got == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
      assert got == pytest.approx(_brute_force(n, c, k), abs=1e-12)


def test_pass_at_k_edges():
  assert metrics.pass_at_k(5, 0, 3) == 0.0
  assert metrics.pass_at_k(5, 5, 1) == 1.0
  assert metrics.pass_at_k(5, 3, 3) == 1.0  # n - c < k.
  assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
  # Large n stays finite and exact enough where the binomials themselves are huge.
  assert metrics.pass_at_k(1000, 1, 500) == pytest.approx(0.5)


@pytest.mark.parametrize("n,c,k", [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1), (0, 0, 1)])
def test_pass_at_k_rejects(n, c, k):
  with pytest.raises(ValueError):
    metrics.pass_at_k(n, c, k)


def test_mean_pass_at_k():
  assert metrics.mean_pass_at_k([(4, 0), (4, 4), (4, 2)], 1) == pytest.approx(0.5)
  assert metrics.mean_pass_at_k([(4, 1), (2, 1)], 2) == pytest.approx((0.5 + 1.0) / 2)
  with pytest.raises(ValueError, match="problem 1: pass@3"):
    metrics.mean_pass_at_k([(4, 1), (2, 1)], 3)
  with pytest.raises(ValueError, match="no problems"):
    metrics.mean_pass_at_k([], 1)


def test_summarize():
  correct = [[True, False, False, True], [False] * 4, [True] * 4]
  thinking = [[10, 20, 30, 40], [5, 5, 5, 5], [1, 2, 3, 4]]
  out = metrics.summarize(correct, {"thinking_tokens": thinking}, ks=(1, 2, 4))
  assert out["problems"] == 3 and out["samples"] == 12
  assert out["n_min"] == out["n_max"] == 4
  assert out["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
  assert out["pass@k"][1] == pytest.approx(out["pass@1"])
  assert out["pass@k"][2] == pytest.approx((1 - 1 / 6 + 0 + 1) / 3)
  assert out["pass@k"][4] == pytest.approx(2 / 3)
  assert out["mean_thinking_tokens"] == pytest.approx(130 / 12)
  assert out["mean_thinking_tokens_correct"] == pytest.approx((10 + 40 + 1 + 2 + 3 + 4) / 6)
  assert out["per_problem"][0] == {"n": 4, "correct": 2, "pass@1": 0.5}


def test_summarize_none_correct_and_uneven_n():
  out = metrics.summarize([[False], [False, False]], {"completion_tokens": [[3], [4, 5]]})
  assert out["pass@1"] == 0.0 and out["n_min"] == 1 and out["n_max"] == 2
  assert out["mean_completion_tokens"] == pytest.approx(4.0)
  assert out["mean_completion_tokens_correct"] is None


def test_summarize_rejects():
  with pytest.raises(ValueError, match="no problems"):
    metrics.summarize([])
  with pytest.raises(ValueError, match="problem 1: no samples"):
    metrics.summarize([[True], []])
  with pytest.raises(ValueError, match="pass@2"):
    metrics.summarize([[True, False], [True]], ks=(2,))
  with pytest.raises(ValueError, match="lengths 'x'"):
    metrics.summarize([[True, False]], {"x": [[1]]})
