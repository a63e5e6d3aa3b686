r"""DeepSeek-R1-Distill-Llama (Llama architecture) as the Llama reasoning model (hub id or path).

  python -m soft_jax.generate --config=configs/soft/llama.py --prompt="..." --json
  python -m soft_jax.generate --config=configs/soft/llama.py:gumbel --prompt="..."
  python -m soft_jax.evaluate --config=configs/soft/llama.py:gumbel,aime2024 --n_samples=16 ...
  python -m soft_jax.generate --config=configs/soft/llama.py \
      --model=deepseek-ai/DeepSeek-R1-Distill-Llama-70B --prompt="..."

After the colon: `variant[,benchmark]`, variant soft (default), dirichlet, gumbel, sample, greedy;
benchmark as in configs/soft (BENCHMARKS: the 2508.03440 per-benchmark K and tau).
The chat template already opens `<think>`; `</think>` is one token.
"""

from configs.soft import preset


def get_config(arg=None):
  # Soft Thinking used the 70B (does not fit one GPU unsharded); 8B shares tokenizer and template.
  return preset(arg, model="deepseek-ai/DeepSeek-R1-Distill-Llama-8B")
