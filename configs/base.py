"""Defaults shared by every CODI config; a config file overrides what differs.

Values follow the reference (shared/spec/codi.md section 4) unless a comment says otherwise.
"""

import ml_collections

from codi_jax import sharding


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 11  # the reference's seed
  config.workdir = ""  # --workdir wins
  config.overwrite = False  # refuse to reuse a workdir that holds a finished run

  config.model = ml_collections.ConfigDict()
  config.model.spec = ""  # HF dir | hub id | .gguf | alias; "" = from scratch with the sizes below
  config.model.arch = "gpt2"
  config.model.vocab_size = 0  # from scratch: 0 = the tokenizer's size
  config.model.num_layers = 2
  config.model.d_model = 64
  config.model.num_heads = 4
  config.model.num_kv_heads = 0  # 0 = num_heads
  config.model.d_ff = 256
  config.model.max_positions = 512
  config.model.dropout = (
    0.1  # GPT-2's embd/attn/resid dropout (from scratch only; loaded models keep theirs)
  )
  config.model.dtype = "float32"  # compute dtype; "bfloat16" for the reference's autocast
  config.model.param_dtype = "float32"  # base weights; the reference keeps them in bf16
  config.model.lora_rank = 128  # 0 = full fine-tuning
  config.model.lora_alpha = 32.0  # scale alpha / r = 0.25
  config.model.lora_dropout = 0.1
  config.tokenizer = "model"  # "model" | "gpt2" | "train_bpe:<vocab>"

  config.codi = ml_collections.ConfigDict(
    dict(
      method="codi",  # codi | cot_sft (teacher only) | no_cot_sft (student with 0 thoughts)
      num_latent=6,
      num_latent_infer=-1,  # -1: same as training
      prj_dim=0,
      use_prj=True,
      prj_layernorm=True,
      prj_dropout=0.0,
      distill_loss="smooth_l1",
      distill_layers="all_plus_embedding",
      distill_div_std=True,
      alpha=1.0,
      beta=1.0,
      gamma=1.0,
      padding_mode="masked",
      separate_teacher_target_pass=False,
      train_special_embeddings=False,
    )
  )  # reference: pad/bot/eot rows stay frozen under LoRA

  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"  # synthetic | gsm8k-aug | gsm8k-aug-nl | commonsense | strategy
  config.data.path = ""  # local JSON/JSONL (else the HF dataset id of the source)
  config.data.valid_path = ""  # validation file; "" = a seeded hold-out of the training data
  config.data.valid_size = 500
  config.data.synthetic = ml_collections.ConfigDict(
    dict(
      train=20000,
      valid=500,
      test=1000,
      min_steps=3,
      max_steps=4,
      min_operand=2,
      max_operand=12,
      max_value=999,
      ops=("+", "-", "*", "/"),
      style="story",
    )
  )
  config.data.include_last_cot = False  # reference: drop the last CoT step
  config.data.keep_non_digit_answers = False  # reference: drop answers not starting with a digit
  config.data.max_token_num = 1000
  config.data.batch_size = 128
  config.data.buckets = 32

  config.optim = ml_collections.ConfigDict(
    dict(
      lr=3e-3,
      warmup_ratio=0.03,
      weight_decay=0.1,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      clip=2.0,
      grad_accum=1,
      num_steps=0,
      epochs=40.0,
    )
  )  # num_steps > 0 overrides epochs

  config.eval = ml_collections.ConfigDict(
    dict(every_steps=1000, num_examples=0, batch_size=128, max_new_tokens=256)
  )  # num_examples 0 = all
  config.log_every = 25

  # Device mesh: one size may be -1 (inferred from the device count). data = pure data parallel,
  # fsdp = data parallel with parameters/optimizer sharded, tensor = heads/MLP/vocab split.
  # GPT-2 and ~1B Llama fit FSDP on one axis; tensor parallelism is for models that don't.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Logical axis (model) -> mesh axes (codi_jax/sharding.py documents each name).
  config.logical_axis_rules = sharding.DEFAULT_RULES

  config.checkpoint = ml_collections.ConfigDict(
    dict(
      every_steps=500,  # plus every evaluation step, the last step, and on SIGTERM
      keep=2,  # the newest `keep`, plus the best by best_metric
      best_metric="auto",  # "auto": student accuracy (teacher for cot_sft); "" keeps only the newest
      best_mode="max",
      async_save=True,
    )
  )
  config.resume = True  # continue from <workdir>/checkpoints when it holds a checkpoint
  return config
