"""Defaults shared by every CODI config; a config file overrides what differs.

Values follow the reference (docs/codi.md, optimisation settings) unless a comment says otherwise.
"""

import ml_collections

# Logical axis (named in the model code) -> mesh axes (config.mesh). Data, not code: a run changes
# its parallelism by editing this table. A dimension that does not divide its mesh axes stays
# replicated (codi_jax/models/partitioning.py).
LOGICAL_AXIS_RULES = (
  # Parameters.
  ("embed", ("fsdp",)),  # FSDP: every weight split along its model-width axis
  ("heads", ("tensor",)),  # attention heads (q and the output projection's input): tensor parallel
  ("kv", ("tensor",)),  # key/value heads (GQA)
  ("mlp", ("tensor",)),  # MLP width: column-parallel up, row-parallel down (Megatron)
  ("vocab", ("tensor",)),  # embedding rows / LM-head columns
  ("layers", ()),  # the leading axis of stacked blocks (model.scan_layers): never split
  # Activations.
  ("batch", ("data", "fsdp")),  # the batch is split over both data-parallel axes
  ("act_heads", ("tensor",)),  # attention inside a tensor-parallel group
  ("act_kv", ("tensor",)),
  ("act_mlp", ("tensor",)),
  ("act_vocab", ("tensor",)),  # logits: vocabulary split, gathered by the loss
  ("act_embed", ()),  # the residual stream: replicated over `tensor`
  ("cache_len", ()),  # the KV cache's slot axis
)


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 11  # the reference's seed
  config.workdir = ""  # --workdir wins
  # refuse to reuse a workdir that holds a finished run; True: once the set-up succeeded, the old
  # run (checkpoints, metrics, final, ...) moves to <workdir>/previous-<UTC time>/, kept
  config.overwrite = False

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
  # xla (our einsum attention) | dot_product (jax.nn.dot_product_attention; same results) |
  # cudnn (its cuDNN kernel: a GPU and bf16/fp16 compute; shapes it refuses run as dot_product)
  config.model.attention_impl = "xla"
  # One lax.scan over layers with stacked block weights (MaxText's default): the compile time of
  # every pass stays flat in depth; False unrolls every layer (docs/scale.md: both measured).
  config.model.scan_layers = True
  config.model.lora_rank = 128  # 0 = full fine-tuning
  config.model.lora_alpha = 32.0  # scale alpha / r = 0.25
  config.model.lora_dropout = 0.1
  config.tokenizer = "model"  # "model" | "gpt2" | "train_bpe:<vocab>"

  config.codi = ml_collections.ConfigDict(
    dict(
      # codi | cot_sft (teacher only) | no_cot_sft (student with 0 thoughts) | coconut | icot_si
      # (the baselines: docs/baselines.md section 4)
      method="codi",
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
      remat_thoughts=False,  # recompute the thought scan in the backward pass (memory option)
      remat_teacher=False,  # recompute each teacher-pass block in the backward pass (memory)
      # what remat keeps: nothing_saveable | dots_saveable | dots_with_no_batch_dims_saveable
      remat_policy="nothing_saveable",
      train_special_embeddings=False,  # reference: pad/bot/eot rows stay frozen under LoRA
      # The training CE runs the LM head fused with it over chunks of this many logits (16 MiB
      # f32, under glibc's 32 MiB mmap limit: reused, not page-faulted in per step), its gradient
      # made in the forward pass (codi_jax/models/head_ce.py); 0 = whole [B, N, V] logits.
      ce_chunk_logits=1 << 22,
      # Coconut (method=coconut; values of the reference's args/gsm_coconut.yaml). Stage k =
      # (step - 1) // stage_steps replaces the first k CoT steps by k * c_thought thoughts.
      c_thought=2,  # continuous thoughts per replaced reasoning step
      max_latent_stage=3,  # stages that replace steps one by one; later stages replace all
      epochs_per_stage=3,  # stage length in epochs (reference), unless stage_steps > 0
      stage_steps=0,  # stage length in optimizer steps; 0 = epochs_per_stage epochs
      pad_latent_to_max=True,  # past the last stage: max_latent_stage * c_thought thoughts always
      uniform_prob=0.0,  # per example: probability of training at a random earlier stage
      # stage trained at step 1 (0..max_latent_stage): 1 continues from a CoT-SFT model, as the
      # reference resumes from its stage-0 checkpoint; later stages follow every stage_steps
      coconut_start_stage=0,
      # iCoT-SI (method=icot_si; values of the published runs). CoT tokens are cut from the front.
      remove_per_epoch=8.0,  # removed tokens grow by 1 every round(steps/epoch / this) steps
      remove_start_from=0,  # tokens removed at step 1
      remove_all_when_remove_beyond=float("inf"),  # whole CoT removed from here on (GSM8k: 39)
      removal_smoothing_lambda=4.0,  # per-example extra o ~ exp(-lambda o), o < 100; inf: o = 0
      keep_position=False,  # True: kept tokens keep their original positions (reference flag)
      # Optimizer restart (both baselines): none | schedule (Coconut: at each stage switch; iCoT-SI:
      # when the removal count grows, as the reference) | epoch (every epoch: Coconut's reference).
      # The restart re-creates AdamW's moments; the learning-rate schedule follows the global step.
      reset_optimizer="schedule",
    )
  )

  config.data = ml_collections.ConfigDict()
  # synthetic | multiplication | gsm8k-aug | gsm8k-aug-nl | commonsense | strategy
  config.data.source = "synthetic"
  config.data.path = ""  # local JSON/JSONL (else the HF dataset id of the source)
  config.data.valid_path = ""  # validation file; "" = a seeded hold-out of the training data
  config.data.valid_size = 500
  # jsonl: `path` as a file (JSON/JSONL, GSM8k JSONL or `||` lines, detected) or the hub;
  # tfds: the ArrayRecord dataset built by codi_jax/data/tfds_gsm8k_aug.py (gsm8k-aug[-nl] only).
  config.data.format = "jsonl"  # jsonl | tfds
  config.data.tfds_data_dir = ""  # format=tfds: its TFDS data_dir (local disk or a gcsfuse mount)
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
  # The iCoT multiplication task (source "multiplication"): K-digit operands; with data.path a
  # folder of the released valid.txt / test.txt (training pairs generated disjoint from them).
  config.data.multiplication = ml_collections.ConfigDict(
    dict(digits=4, train=20000, valid=256, test=1000)
  )
  config.data.include_last_cot = False  # reference: drop the last CoT step
  config.data.keep_non_digit_answers = False  # reference: drop answers not starting with a digit
  config.data.max_token_num = 1000
  config.data.batch_size = 128
  config.data.buckets = 32  # length multiple (training: the largest one of a segment)
  # Each training segment's multiple is the largest power of 2 <= max_padding * its length (within
  # 1..buckets): padding stays under 1/8 (65/94/7 tokens -> 72/96/7, not 96/96/32, which cost
  # 20-43% of a CPU step). 0: every segment a multiple of `buckets` (the earlier rule).
  config.data.max_padding = 0.125

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
      num_steps=0,  # 0: `epochs` epochs, the step count they make printed at the start
      epochs=40.0,
    )
  )  # num_steps > 0 overrides epochs

  config.eval = ml_collections.ConfigDict(
    dict(
      every_steps=1000,
      num_examples=0,  # 0 = all
      batch_size=128,
      max_new_tokens=256,
      baseline_note="",  # printed beside the final accuracies (the demo: No-CoT-SFT's figure)
    )
  )
  config.log_every = 25

  # Device mesh: one size may be -1 (inferred from the device count). data = pure data parallel,
  # fsdp = data parallel with parameters/optimizer sharded, tensor = heads/MLP/vocab split.
  # GPT-2 and ~1B Llama fit FSDP on one axis; tensor parallelism is for models that don't.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Logical axis (model) -> mesh axes (codi_jax/sharding.py documents each name).
  config.logical_axis_rules = LOGICAL_AXIS_RULES

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


def variants(arg, allowed) -> set:
  """The comma-separated variants of `--config=file.py:a,b`, checked against `allowed`."""
  chosen = {v for v in (arg or "").split(",") if v}
  unknown = sorted(chosen - set(allowed))
  if unknown and not allowed:
    raise ValueError(f"unknown variant(s) {unknown}: this config takes no variants (drop ':{arg}')")
  if unknown:
    raise ValueError(f"unknown variant(s) {unknown} (choose from {', '.join(sorted(allowed))})")
  return chosen


def reproduction(config, ours: bool):
  """What a paper-reproduction config runs: the reference's behaviour (default) or our fixes.

  Reference (docs/codi.md 10): pads attended by the latent and answer passes with slot-index
  positions, batches padded to their maximum ("official"), the teacher run twice (targets and CE,
  two dropout masks), pad/bot/eot rows frozen under LoRA. Ours (`:ours`): pads masked and
  positions counted from each row's first token (batch- and bucket-invariant), one teacher pass
  (stop-gradient targets), pad/bot/eot trainable (the paper calls them learnable).
  """
  c = config.codi
  c.padding_mode = "masked" if ours else "official"
  c.separate_teacher_target_pass = not ours
  c.train_special_embeddings = ours
  return config
