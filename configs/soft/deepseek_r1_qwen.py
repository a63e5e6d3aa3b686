r"""DeepSeek-R1-Distill-Qwen (Qwen2 architecture), a model of both papers (hub id or local path).

  python -m soft_jax.generate --config=configs/soft/deepseek_r1_qwen.py --prompt="..." --json
  python -m soft_jax.generate --config=configs/soft/deepseek_r1_qwen.py:gumbel --prompt="..."
  python -m soft_jax.evaluate --config=configs/soft/deepseek_r1_qwen.py:gumbel,math500 ...
  python -m soft_jax.generate --config=configs/soft/deepseek_r1_qwen.py \
      --model=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --prompt="..."

After the colon: `variant[,benchmark]`, variant soft (default), dirichlet, gumbel, sample, greedy;
benchmark as in configs/soft (BENCHMARKS: the 2508.03440 per-benchmark K and tau).
The chat template already opens `<think>`; `</think>` is one token.
"""

from configs.soft import preset


def get_config(arg=None):
  # 32B is the papers' size (~64 GB of bf16 weights: one 80 GB GPU at batch 1); 1.5B/7B/14B share
  # the tokenizer and settings, swap with --model.
  return preset(arg, model="deepseek-ai/DeepSeek-R1-Distill-Qwen-32B")
