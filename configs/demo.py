r"""CPU demo: a tiny GPT-2-style model trained from scratch with CODI on the built-in synthetic task.

  python -m codi_jax.train --config=configs/demo.py
  python -m codi_jax.train --config=configs/demo.py --config.codi.method=cot_sft --workdir=/tmp/cot
  python -m codi_jax.train --config=configs/demo.py --config.codi.method=no_cot_sft --workdir=/tmp/nocot
  python -m codi_jax.train --config=configs/demo.py --config.codi.method=coconut --workdir=/tmp/coconut
  python -m codi_jax.train --config=configs/demo.py --config.codi.method=icot_si --workdir=/tmp/icot

Finishes in a few minutes on 2 CPU cores and prints the validation accuracy of the teacher (explicit
CoT) and the student (continuous thoughts).
"""

import ml_collections

from configs import base


def get_config(arg=None):
  base.variants(arg, ())  # no variants: `demo.py:ours` is refused, not ignored
  config = base.get_config()
  config.workdir = "/tmp/codi_demo"

  # From scratch: no pretrained weights; a small BPE is fitted to the synthetic training text.
  config.model.spec = ""
  config.model.arch = "gpt2"
  config.model.num_layers = 4
  config.model.d_model = (
    128  # the trial size; wide enough to hold 2-digit intermediate values
  )
  config.model.num_heads = 4
  config.model.d_ff = 512
  config.model.max_positions = 256
  config.model.dropout = 0.0  # tiny data, few steps: dropout only slows convergence here
  config.model.lora_rank = 0  # full training (there is no pretrained base to freeze)
  # Word-level merges keep terse questions at ~21 tokens; ":numbers" makes every value up to 30 one
  # token, as GPT-2's BPE does for the paper's small numbers: one operation is a one-token fact.
  # With digits split instead ("train_bpe:1024"), CoT-SFT reached only 57 +- 11% at this budget.
  config.tokenizer = "train_bpe:1024:numbers"

  config.data.source = "synthetic"
  config.data.synthetic = ml_collections.ConfigDict(
    dict(
      train=20000,
      valid=256,
      test=512,
      min_steps=3,
      max_steps=3,  # 3 dependent operations
      # Values up to 30: a 4-layer d=128 model learns these facts within the 10-minute budget (up to
      # 99 it reached 6% teacher / 11% student after 600 steps, against 13% / 18% here).
      min_operand=2,
      max_operand=9,
      max_value=30,
      ops=("+", "-", "*"),
      style="terse",
    )
  )  # ~25-token questions instead of ~42: the step cost is mostly tokens
  # The reference drops the last CoT step (GSM8k-Aug's last step restates the answer); ours keeps it
  # so the teacher's CoT states every intermediate value the student must carry in its thoughts.
  config.data.include_last_cot = True
  config.data.batch_size = 32
  config.data.buckets = 4  # tight padding: one shape (question 32, teacher 64, answer 12 tokens)

  config.codi.num_latent = 6
  config.codi.beta = 1.0
  config.codi.gamma = 1.0
  # The baselines' curricula in steps (their references pace them in epochs of GSM8k-Aug; an
  # epoch here is 625 steps, more than a third of the run). docs/baselines.md section 4.
  config.codi.stage_steps = 160  # Coconut: stage k from step 160k+1; all 3 steps latent from 481
  config.codi.remove_per_epoch = 25.0  # iCoT-SI: a token every 25 steps, all ~25 by step ~650

  config.optim.lr = 3e-3  # the reference GPT-2 LR; stable here with warmup + clipping
  config.optim.weight_decay = 0.1
  # 800 steps on 2 cores: 3m19s in all from an empty compile cache, idle, 2026-12-08
  # (docs/results.md). The comparison table (experiments/toy_table.py) trains every method with
  # this same budget.
  config.optim.num_steps = 800
  config.optim.warmup_ratio = 0.03

  config.eval.every_steps = 400
  config.eval.max_new_tokens = 48  # teacher: CoT (~25 tokens) + "The answer is: N"
  config.eval.batch_size = 128
  # What the thoughts buy: the same task and budget without them (docs/results.md, "The paper's
  # comparison").
  config.eval.baseline_note = (
    "No-CoT-SFT, same task and 800 steps: 10.2% on the test split, experiments/toy_table.py seed 11"
  )
  return config
