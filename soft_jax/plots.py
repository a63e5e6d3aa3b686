"""PNG figures of the Soft Thinking analyses (one function per analysis, headless Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def js_probe(js, names: Sequence[str], title: str, path: str) -> None:
  """Histograms of JS(top-1, soft) and JS(top-2, soft) over the probed steps; js [n, 3]."""
  fig, ax = plt.subplots(figsize=(6, 4))
  bins = np.linspace(0, math.log(2), 41)
  for i, n in enumerate(names):
    ax.hist(np.asarray(js)[:, i], bins=bins, alpha=0.6, label=n.replace("_", " "))
  ax.set_xlabel("JS divergence (nats)")
  ax.set_ylabel("steps")
  ax.set_title(title)
  ax.legend()
  _save(fig, path)


def logit_lens(mean, title: str, path: str) -> None:
  """Per-layer overlap of each single-token run with the mixture run; mean [L+1, 2]."""
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(mean[:, 0], marker="o", label="top-5 of t1 run in top-10 of mix")
  ax.plot(mean[:, 1], marker="s", label="top-5 of t2 run in top-10 of mix")
  ax.set_xlabel("hidden state (0 = embeddings)")
  ax.set_ylabel("overlap")
  ax.set_ylim(0, 1.05)
  ax.set_title(title)
  ax.legend()
  _save(fig, path)


def rouge(f1: Mapping[str, Sequence[float]], title: str, path: str) -> None:
  """Box plot of ROUGE-L F1 against greedy, one box per mode."""
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.boxplot(list(f1.values()))
  ax.set_xticks(range(1, len(f1) + 1), list(f1))
  ax.set_ylabel("ROUGE-L F1 vs greedy")
  ax.set_ylim(0, 1.05)
  ax.set_title(title)
  _save(fig, path)


def randomness(rows: Sequence[Mapping], vanilla: float, path: str) -> None:
  """Randomness and softness against gamma (Dirichlet) and tau (Gumbel), log x axes."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, noise, label in ((axes[0], "dirichlet", "gamma"), (axes[1], "gumbel", "tau")):
    rs = [r for r in rows if r["noise"] == noise]
    x = [r["value"] for r in rs]
    ax.plot(x, [r["randomness"] for r in rs], marker="o", label="randomness JS(st', st)")
    ax.plot(x, [r["softness"] for r in rs], marker="s", label="softness H(st')")
    ax.axhline(vanilla, color="gray", ls="--", lw=1, label="H(st), vanilla")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("nats")
    ax.set_title(noise)
    ax.legend(fontsize=8)
  _save(fig, path)
