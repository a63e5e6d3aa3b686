r"""The toy "pretrained base": configs/demo.py's model trained from scratch on 1-2 operation problems.

  python -m codi_jax.train --config=configs/toy_base.py --workdir=/tmp/toy_base
  python -m codi_jax.export --workdir=/tmp/toy_base --out=/tmp/toy_base_hf

A related but different distribution from the demo's task: the same terse wording and values (<= 30),
but chains of 1 or 2 operations with operands up to 30, every expression written with its result
(`<<7-2=5>> <<5*5=25>>`, the last step kept), learned left to right by CoT-SFT (all weights). No
3-step problem is ever seen. The exported directory is the base that experiments/toy_table.py
--regime=pretrained_lora fine-tunes with LoRA (`--config.model.spec=<dir>`, its tokenizer reused:
`--config.tokenizer=model`), as the paper fine-tunes a pretrained GPT-2.
"""

from configs import base, demo


def get_config(arg=None):
  base.variants(arg, ())
  config = demo.get_config()
  config.workdir = "/tmp/codi_toy_base"
  config.codi.method = "cot_sft"  # left-to-right text: CoT and answer after the question
  s = config.data.synthetic
  s.min_steps, s.max_steps = 1, 2
  # Operands up to the value cap: every one-operation fact on 2..30 appears (20.5k distinct train
  # chains; with the demo's operands up to 9 only 1.8k exist).
  s.max_operand = 30
  s.train = 16000
  config.data.include_last_cot = True  # the whole expression chain, results included
  config.optim.num_steps = 2000
  config.checkpoint.every_steps = 500
  config.eval.every_steps = 500
  config.eval.baseline_note = ""
  return config
