"""Evaluation metrics over n samples per problem: pass@1, unbiased pass@k, mean lengths (docs/soft_thinking.md 9.3, 9.4).

pass@k is the unbiased estimator of arXiv 2107.03374: for a problem with n samples of which c are
correct, 1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (1 when n - c < k),
then averaged over problems. Per-problem pass@1 is the mean correctness of its samples; the dataset
pass@1 is the mean over problems. Mean lengths are over all samples, and over the correct ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one problem with `n` samples, `c` of them correct.

  Raises:
    ValueError: unless 0 <= c <= n and 1 <= k <= n.
  """
  if n < 1 or not 0 <= c <= n:
    raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
  if not 1 <= k <= n:
    raise ValueError(f"pass@{k} needs 1 <= k <= n (samples per problem), got n={n}")
  if n - c < k:
    return 1.0
  return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
  """pass@k averaged over problems, from each problem's (n, c).

  Raises:
    ValueError: for no problems, or a problem whose n or c does not allow pass@k (named by index).
  """
  if not counts:
    raise ValueError("no problems to average pass@k over")
  total = 0.0
  for i, (n, c) in enumerate(counts):
    try:
      total += pass_at_k(n, c, k)
    except ValueError as e:
      raise ValueError(f"problem {i}: {e}") from None
  return total / len(counts)


def _mean(values: Sequence[float]) -> float | None:
  return sum(values) / len(values) if values else None


def summarize(
  correct: Sequence[Sequence[bool]],
  lengths: Mapping[str, Sequence[Sequence[float]]] | None = None,
  ks: Sequence[int] = (1,),
) -> dict[str, Any]:
  """Dataset metrics from per-problem sample results.

  Args:
    correct: correct[p][s] is whether sample s of problem p is right (n may differ per problem).
    lengths: Named per-sample lengths shaped like `correct`, e.g. {"thinking_tokens": ...,
      "completion_tokens": ...}.
    ks: The k of each pass@k to report (each at most the smallest n).

  Returns:
    {"problems", "samples", "n_min", "n_max", "pass@1", "pass@k": {k: value}, "per_problem":
    [{"n", "correct", "pass@1"}], and for each length name L: "mean_L" over all samples and
    "mean_L_correct" over correct samples (None when no sample is correct)}. "pass@1" is the mean
    over problems of their mean correctness, equal to pass@k at k=1.

  Raises:
    ValueError: for no problems, a problem without samples, a k above some n, or lengths not
      shaped like `correct`.
  """
  if not correct:
    raise ValueError("no problems to summarize")
  for i, row in enumerate(correct):
    if not row:
      raise ValueError(f"problem {i}: no samples")
  counts = [(len(row), sum(bool(x) for x in row)) for row in correct]
  per_problem = [{"n": n, "correct": c, "pass@1": c / n} for n, c in counts]
  out: dict[str, Any] = {
    "problems": len(correct),
    "samples": sum(n for n, _ in counts),
    "n_min": min(n for n, _ in counts),
    "n_max": max(n for n, _ in counts),
    "pass@1": sum(p["pass@1"] for p in per_problem) / len(per_problem),
    "pass@k": {int(k): mean_pass_at_k(counts, int(k)) for k in ks},
  }
  for name, values in (lengths or {}).items():
    if len(values) != len(correct) or any(len(v) != len(r) for v, r in zip(values, correct)):
      raise ValueError(f"lengths {name!r}: not shaped like `correct` (one value per sample)")
    flat = [(float(x), bool(ok)) for v, r in zip(values, correct) for x, ok in zip(v, r)]
    out[f"mean_{name}"] = _mean([x for x, _ in flat])
    out[f"mean_{name}_correct"] = _mean([x for x, ok in flat if ok])
  out["per_problem"] = per_problem
  return out
