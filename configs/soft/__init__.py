"""Soft Thinking presets shared by the per-model configs (docs/soft_thinking.md sections 6 and 7).

A per-model file calls `preset(arg, model=...)` and overrides what differs. `arg` is what follows
the colon of `--config=configs/soft/<model>.py:<arg>`: `variant[,benchmark]`. Variants:

  soft       vanilla Soft Thinking, the 2505.15778 settings (the default)
  dirichlet  Stochastic Soft Thinking with Dirichlet resampling, the 2508.03440 scripts
  gumbel     Stochastic Soft Thinking with Gumbel-Softmax, the 2508.03440 scripts
  sample     token sampling (the CoT baseline of both papers)
  greedy     token greedy decoding

A benchmark (one of BENCHMARKS) sets what the 2508.03440 run scripts set per benchmark for the
dirichlet and gumbel variants (docs/soft_thinking.md 7): K = 15 on AIME24/AIME25/AMC23, else 10;
Gumbel tau = 0.6 on MATH500/GPQA-Diamond, else 0.5; Dirichlet gamma 4 throughout. Without one they
keep K = 10 and tau = 0.5 (the code-benchmark values). The other variants have no per-benchmark
settings and take a benchmark unchanged. The scripts' samples per problem (16 on AIME/AMC, else 1)
are the evaluation's `--n_samples`, not part of a preset.
"""

import ml_collections

from configs.base import LOGICAL_AXIS_RULES

VARIANTS = ("soft", "dirichlet", "gumbel", "sample", "greedy")
STOCHASTIC = ("dirichlet", "gumbel")

_AIME_AMC = {"max_topk": 15, "gumbel_tau": 0.5, "dirichlet_alpha": 4.0}
_MATH500_GPQA = {"max_topk": 10, "gumbel_tau": 0.6, "dirichlet_alpha": 4.0}
_CODE = {"max_topk": 10, "gumbel_tau": 0.5, "dirichlet_alpha": 4.0}
# The 2508.03440 run scripts' sampler values per benchmark (docs/soft_thinking.md 7); names as in
# docs/soft_thinking.md 9.1. Gamma is stated only for AIME/AMC; 4 elsewhere is our choice.
BENCHMARKS = {
  "aime2024": _AIME_AMC,
  "aime2025": _AIME_AMC,
  "amc23": _AIME_AMC,
  "math500": _MATH500_GPQA,
  "gpqa_diamond": _MATH500_GPQA,
  "humaneval": _CODE,
  "mbpp": _CODE,
  "livecodebench": _CODE,
}


def parse_arg(arg=None) -> tuple[str, str | None]:
  """`variant[,benchmark]` -> (variant, benchmark or None); None or "" -> ("soft", None)."""
  variant, _, benchmark = (arg or "").partition(",")
  variant, benchmark = variant.strip() or "soft", benchmark.strip() or None
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
  if benchmark is not None and benchmark not in BENCHMARKS:
    raise ValueError(
      f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}"
      " (after the variant: `gumbel,math500`)"
    )
  return variant, benchmark


def preset(
  arg=None,
  *,
  model: str,
  dtype: str = "bfloat16",
  max_new_tokens: int = 32768,
  chat: bool = True,
) -> ml_collections.ConfigDict:
  """The ConfigDict of `--config=<model file>:<arg>`, arg = `variant[,benchmark]` (None: soft)."""
  variant, benchmark = parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.model = model  # alias | HF directory | .gguf | hub id
  config.mode = variant  # greedy | sample | soft | dirichlet | gumbel
  config.chat = (
    chat  # one user turn through the chat template, no system prompt (docs/soft_thinking.md 9.2)
  )
  config.dtype = dtype  # compute and parameter dtype
  config.max_new_tokens = max_new_tokens  # one budget for thinking + answer (reference: 32768)
  config.length_bucket = 32  # prompt lengths padded to a multiple: one compile per bucket
  config.seed = 0  # the reference runs use seed 0
  # "data,fsdp,tensor", e.g. "1,1,-1": tensor parallel over every device (big models).
  config.mesh = ""
  config.logical_axis_rules = LOGICAL_AXIS_RULES  # with --mesh; configs/base.py explains each
  config.think_end = "auto"  # "auto": a single `</think>` token if the vocabulary has one; "none"
  config.think_end_last_id = False  # True: the last id of a multi-token `</think>` (official rule)

  s = ml_collections.ConfigDict()
  s.temperature = 0.6  # every script of both papers uses 0.6 in both phases
  s.top_k = 30
  s.top_p = 0.95
  s.min_p = 0.001  # the Soft Thinking value; the SST scripts and token baselines use 0.0
  s.max_topk = 10  # K: README range 5-20; the driver default (15) and ServerArgs (30) differ
  s.dirichlet_alpha = 4.0  # gamma: the SST grid {1..10}, best 4
  s.gumbel_tau = 0.5  # tau: SST AIME/AMC/code value (0.6 for MATH500, GPQA: see BENCHMARKS)
  s.after_temperature = 0.6  # applied (the reference ignored it; identical to T in every script)
  s.after_top_k = 30
  s.after_top_p = 0.95
  s.after_min_p = 0.0
  s.cold_stop_entropy = 0.01  # theta in nats: the README default (range 0-0.1)
  s.cold_stop_patience = 256  # P: the README default (range 256-1024)
  s.entropy_normalized = False  # nats ([ST]); True divides by ln V ([SST])
  s.max_thinking_tokens = 0  # off, for parity: the reference has no thinking budget
  s.answer_phase = "sample"  # the intended answer phase; "legacy_argmax" = published numbers
  s.answer_low_entropy_abort = False  # HEAD-only abort, added after both papers
  s.embed_mix_dtype = "float32"  # f32 accumulation; "model" = the reference's model-dtype sum
  config.sampler = s

  if variant in STOCHASTIC:
    s.min_p = 0.0  # the SST scripts
    # SST ran theta = 0.1 on the ln V-normalised entropy with P = the token budget: Cold Stop off.
    s.entropy_normalized = True
    s.cold_stop_entropy = 0.1
    s.cold_stop_patience = max_new_tokens
    if benchmark is not None:
      s.update(BENCHMARKS[benchmark])
  if variant in ("sample", "greedy"):
    s.min_p = 0.0  # the token baselines' min-p
  return config
