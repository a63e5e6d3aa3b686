r"""QwQ-32B (Qwen2 architecture), the main model of Soft Thinking (hub id or local path).

  python -m soft_jax.generate --config=configs/soft/qwq.py --prompt="..." --json
  python -m soft_jax.generate --config=configs/soft/qwq.py:dirichlet --prompt="..."
  python -m soft_jax.evaluate --config=configs/soft/qwq.py:gumbel,math500 --data=... --out=...

After the colon: `variant[,benchmark]`, variant soft (default), dirichlet, gumbel, sample, greedy;
benchmark as in configs/soft (BENCHMARKS: the 2508.03440 per-benchmark K and tau).
The chat template already opens `<think>`; `</think>` is one token.
"""

from configs.soft import preset


def get_config(arg=None):
  # ~64 GB of bf16 weights: one 80 GB GPU at batch 1 with the 32768-token cache (~8 GB).
  return preset(arg, model="Qwen/QwQ-32B")
