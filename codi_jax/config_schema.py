"""Every config field's rule in one place, and the validation pass each entry point runs first.

A rule is declared per field path, beside nothing else:

    "optim.lr": Num(gt=0, doc="peak learning rate"),
    "codi.method": Enum(ref("codi_jax.codi.model", "METHODS"), doc="training method"),

`Int`, `Num`, `Bool`, `Str`, `Enum`, `Seq` and `Custom` build a `Rule` (type, range or choices,
doc); rules whose allowed values live in another module name them lazily (`ref`), so the
choices have one owner. Cross-field rules are `Cross` entries in `CROSS_TRAIN` (config_cross.py);
the rule types and the checks that apply them are config_rules.py.

- `validate_train(config)`: a training config (configs/*.py) against `TRAIN`: unknown and
  missing keys, each value's type and range, then `CROSS_TRAIN`. `train_lib.train_and_evaluate`
  runs it before anything else; `codi_jax.evaluate` runs it on a `--config` override.
- `EVAL`: the flags of `codi_jax.evaluate` (`eval_lib.Options.check`).
- `SOFT`: a soft-thinking preset's fields, which are also the soft CLIs' flags of the same names;
  `SOFT_FLAGS`: their other flags; `SAMPLER`: the sampler knobs (`SamplerParams.validate`).

The first failure raises one InputError line naming the field, the value and what is allowed:
`--config.optim.lr: got -1.0; expected a number > 0`.
"""

from __future__ import annotations

import functools

from codi_jax.config_cross import CROSS_TRAIN, train_bpe_spec
from codi_jax.config_rules import (
  Bool,
  Context,
  Custom,
  Enum,
  Int,
  Num,
  Rule,
  Seq,
  Str,
  check_tree,
  is_int,
  literal,
  ref,
)
from codi_jax.errors import InputError

INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------------- value checks


def _tokenizer_ok(v) -> bool:
  if v in ("model", "gpt2"):
    return True
  bpe = train_bpe_spec(v)
  return bpe is not None and (v == "train_bpe" or 257 <= bpe[0] <= 10**7)


def _mesh_size_ok(v) -> bool:
  return is_int(v) and (v == -1 or 1 <= v <= 1 << 20)


def _mesh_text_ok(v) -> bool:
  if not isinstance(v, str):
    return False
  if not v:
    return True
  sizes = [int(x) for x in v.split(",")]
  return len(sizes) == 3 and all(_mesh_size_ok(s) for s in sizes) and sizes.count(-1) <= 1


def _axis_rules_ok(v) -> bool:
  from codi_jax import sharding  # pylint: disable=import-outside-toplevel

  if not isinstance(v, list | tuple):
    return False
  try:
    sharding.rules_from_config(v)
  except InputError:
    return False
  return all(isinstance(e, list | tuple) and isinstance(e[0], str) for e in v)


_DTYPES = ("float32", "bfloat16", "float16")
_MESH_SIZE = Custom(_mesh_size_ok, "-1 (the remaining devices) or an integer >= 1")
_AXIS_RULES = Custom(
  _axis_rules_ok,
  "a list of (logical axis, mesh axes) pairs over the mesh axes data, fsdp, tensor",
  doc="logical axis -> mesh axes (configs/base.py explains each name)",
)
_DROPOUT = {"ge": 0.0, "lt": 1.0}
_SEED = Int(0, INT32_MAX - 2, doc="random seed (seed + 1 and + 2 seed other streams)")

# ------------------------------------------------------------------------- training configs

TRAIN: dict[str, Rule] = {
  "seed": _SEED,
  "workdir": Str(doc="output directory ('' = --workdir)"),
  "overwrite": Bool(doc="start over in a workdir that holds a finished run or checkpoints"),
  "resume": Bool(doc="continue from <workdir>/checkpoints"),
  "log_every": Int(1, doc="steps between metric lines"),
  "tokenizer": Custom(
    _tokenizer_ok,
    "model, gpt2, train_bpe or train_bpe:<vocab >= 257>[:numbers]",
    doc="tokenizer (train_bpe: digits one per token; :numbers merges whole numbers)",
  ),
  "logical_axis_rules": _AXIS_RULES,
  # Model.
  "model.spec": Str(doc="HF dir | hub id | .gguf | alias; '' = from scratch"),
  "model.arch": Enum(ref("codi_jax.models.config", "ARCHS"), doc="architecture (from scratch)"),
  "model.vocab_size": Int(0, doc="from scratch: 0 = the tokenizer's size"),
  "model.num_layers": Int(1, doc="from scratch"),
  "model.d_model": Int(1, doc="from scratch"),
  "model.num_heads": Int(1, doc="from scratch"),
  "model.num_kv_heads": Int(0, doc="from scratch: 0 = num_heads"),
  "model.d_ff": Int(1, doc="from scratch"),
  "model.max_positions": Int(1, doc="from scratch: positions (GPT-2: rows of its table)"),
  "model.dropout": Num(**_DROPOUT, doc="GPT-2 embedding/attention/residual dropout (scratch)"),
  "model.dtype": Enum(_DTYPES, doc="compute dtype"),
  "model.param_dtype": Enum(_DTYPES, doc="base weights' dtype"),
  "model.attention_impl": Enum(
    literal("codi_jax.models.config", "AttentionImpl"), doc="attention kernel"
  ),
  "model.scan_layers": Bool(doc="one lax.scan over stacked layers (False: unrolled)"),
  "model.lora_rank": Int(0, doc="0 = full fine-tuning"),
  "model.lora_alpha": Num(gt=0, doc="LoRA scale alpha / rank"),
  "model.lora_dropout": Num(**_DROPOUT, doc="LoRA input dropout"),
  # Method.
  "codi.method": Enum(ref("codi_jax.codi.model", "METHODS"), doc="training method"),
  "codi.num_latent": Int(0, doc="continuous thoughts in training"),
  "codi.num_latent_infer": Int(-1, doc="thoughts at inference; -1 = num_latent"),
  "codi.prj_dim": Int(0, doc="projection width; 0 = d_model"),
  "codi.use_prj": Bool(doc="feed thoughts through the projection"),
  "codi.prj_layernorm": Bool(doc="layer norm after the projection"),
  "codi.prj_dropout": Num(**_DROPOUT, doc="projection dropout"),
  "codi.distill_loss": Enum(
    literal("codi_jax.codi.model", "CodiOptions", "distill_loss"), doc="distillation loss"
  ),
  "codi.distill_layers": Enum(
    literal("codi_jax.codi.model", "CodiOptions", "distill_layers"), doc="distilled layers"
  ),
  "codi.distill_div_std": Bool(doc="divide the distillation loss by the teacher's std"),
  "codi.alpha": Num(ge=0, doc="student CE weight"),
  "codi.beta": Num(ge=0, doc="distillation weight"),
  "codi.gamma": Num(ge=0, doc="teacher CE weight"),
  "codi.padding_mode": Enum(
    literal("codi_jax.models.positions", "PaddingMode"), doc="padded questions"
  ),
  "codi.separate_teacher_target_pass": Bool(doc="reference: run the teacher twice"),
  "codi.remat_thoughts": Bool(doc="recompute the thought scan in the backward pass"),
  "codi.remat_teacher": Bool(doc="recompute each teacher-pass block in the backward pass"),
  "codi.remat_policy": Enum(
    literal("codi_jax.models.layers", "RematPolicy"), doc="what remat keeps"
  ),
  "codi.train_special_embeddings": Bool(doc="train the pad/bot/eot rows under LoRA"),
  "codi.ce_chunk_logits": Int(0, INT32_MAX, doc="logits per fused LM-head + CE chunk; 0 = whole"),
  "codi.c_thought": Int(1, doc="Coconut: thoughts per replaced step"),
  "codi.max_latent_stage": Int(0, doc="Coconut: stages replacing steps one by one"),
  "codi.epochs_per_stage": Int(0, doc="Coconut: stage length in epochs"),
  "codi.stage_steps": Int(0, doc="Coconut: stage length in steps; 0 = epochs_per_stage"),
  "codi.pad_latent_to_max": Bool(doc="Coconut: all thoughts past the last stage"),
  "codi.coconut_start_stage": Int(
    0, doc="Coconut: stage at step 1 (<= max_latent_stage); 1 after CoT-SFT"
  ),
  "codi.uniform_prob": Num(
    ge=0, le=1, f32=False, doc="Coconut: probability of a random earlier stage"
  ),
  "codi.remove_per_epoch": Num(gt=0, doc="iCoT-SI: removal rounds per epoch"),
  "codi.remove_start_from": Int(0, doc="iCoT-SI: tokens removed at step 1"),
  "codi.remove_all_when_remove_beyond": Num(
    ge=0, inf=True, f32=False, doc="iCoT-SI: remove the whole CoT"
  ),
  "codi.removal_smoothing_lambda": Num(
    ge=0, inf=True, f32=False, doc="iCoT-SI: offset smoothing; inf: off"
  ),
  "codi.keep_position": Bool(doc="iCoT-SI: kept tokens keep their positions"),
  "codi.reset_optimizer": Enum(
    ref("codi_jax.data.curriculum", "RESETS"), doc="baselines: optimizer restarts"
  ),
  # Data.
  "data.source": Enum(
    lambda: ("synthetic", "multiplication", *ref("codi_jax.data.readers", "TRAIN_SETS")()),
    doc="training set",
  ),
  "data.path": Str(doc="local file or folder, else the source's hub id"),
  "data.valid_path": Str(doc="validation file; '' = a hold-out"),
  "data.valid_size": Int(1, doc="hold-out size (at most a tenth of the data)"),
  "data.format": Enum(ref("codi_jax.data.sources", "FORMATS"), doc="jsonl | tfds"),
  "data.tfds_data_dir": Str(doc="format=tfds: the TFDS data_dir"),
  "data.synthetic.train": Int(1, doc="synthetic training problems"),
  "data.synthetic.valid": Int(1, doc="synthetic validation problems"),
  "data.synthetic.test": Int(1, doc="synthetic test problems"),
  "data.synthetic.min_steps": Int(1, doc="fewest operations per problem"),
  "data.synthetic.max_steps": Int(1, 64, doc="most operations per problem"),
  "data.synthetic.min_operand": Int(1, doc="smallest operand"),
  "data.synthetic.max_operand": Int(1, doc="largest operand"),
  "data.synthetic.max_value": Int(1, doc="cap on every intermediate value"),
  "data.synthetic.ops": Seq(
    Enum(ref("codi_jax.data.synthetic", "OPS")), nonempty=True, doc="operators"
  ),
  "data.synthetic.style": Enum(ref("codi_jax.data.synthetic", "_STYLES"), doc="wording"),
  "data.multiplication.digits": Int(1, 64, doc="operand digits"),
  "data.multiplication.train": Int(1, doc="training pairs"),
  "data.multiplication.valid": Int(1, doc="validation pairs"),
  "data.multiplication.test": Int(1, doc="test pairs"),
  "data.include_last_cot": Bool(doc="keep the last CoT step (reference: drop it)"),
  "data.keep_non_digit_answers": Bool(doc="keep answers not starting with a digit"),
  "data.max_token_num": Int(1, doc="longest example kept, in tokens"),
  "data.batch_size": Int(1, doc="global training batch"),
  "data.buckets": Int(1, doc="length bucket granularity (tokens)"),
  "data.max_padding": Num(
    ge=0, lt=1, f32=False, doc="training segment padding bound (fraction); 0: multiples of buckets"
  ),
  # Optimizer.
  "optim.lr": Num(gt=0, doc="peak learning rate"),
  "optim.warmup_ratio": Num(ge=0, lt=1, f32=False, doc="warm-up share of the steps"),
  "optim.weight_decay": Num(ge=0, doc="AdamW weight decay"),
  "optim.b1": Num(ge=0, lt=1, doc="Adam beta1"),
  "optim.b2": Num(ge=0, lt=1, doc="Adam beta2"),
  "optim.eps": Num(gt=0, doc="Adam epsilon"),
  "optim.clip": Num(gt=0, doc="global-norm clipping threshold"),
  "optim.grad_accum": Int(1, doc="micro-batches per update"),
  "optim.num_steps": Custom(
    lambda v: is_int(v) and (v == 0 or 2 <= v <= INT32_MAX),
    "0 (use epochs) or an integer >= 2 (one warm-up and one decay step at least)",
    doc="optimizer steps; 0 = epochs",
  ),
  "optim.epochs": Num(ge=0, le=1e6, f32=False, doc="epochs when num_steps = 0"),
  # Validation during training.
  "eval.every_steps": Int(1, doc="steps between validations"),
  "eval.num_examples": Int(0, doc="validation examples; 0 = all"),
  "eval.batch_size": Int(1, doc="validation batch"),
  "eval.max_new_tokens": Int(1, doc="decoding cap"),
  "eval.baseline_note": Str(doc="text printed beside the final accuracies"),
  # Parallelism.
  "mesh.data": _MESH_SIZE,
  "mesh.fsdp": _MESH_SIZE,
  "mesh.tensor": _MESH_SIZE,
  # Checkpoints.
  "checkpoint.every_steps": Int(0, doc="steps between checkpoints; 0 = only at evaluations"),
  "checkpoint.keep": Int(1, doc="newest checkpoints kept"),
  "checkpoint.best_metric": Str(doc="auto | '' | valid/<mode>_acc | valid/<mode>_tokens"),
  "checkpoint.best_mode": Enum(("max", "min"), doc="best = largest or smallest"),
  "checkpoint.async_save": Bool(doc="save in the background"),
}


def validate_train(
  config,
  *,
  sections=None,
  devices: int | None = None,
  processes: int | None = None,
  platform: str | None = None,
) -> None:
  """Checks a training config before any work: keys, fields, then `CROSS_TRAIN`.

  sections: top-level names whose values and cross rules apply (None: all), e.g. the `data`,
  `eval` and `seed` a `codi_jax.evaluate --config` override replaces. devices / processes /
  platform default to this job's.
  """
  check_tree(config, TRAIN, prefix="--config.", only=sections)
  if devices is None or processes is None or platform is None:
    import jax  # pylint: disable=import-outside-toplevel

    devices = jax.device_count() if devices is None else devices
    processes = jax.process_count() if processes is None else processes
    platform = jax.default_backend() if platform is None else platform
  ctx = Context(devices, processes, platform)
  for rule in CROSS_TRAIN:
    if sections is None or all(f.split(".")[0] in sections for f in rule.fields):
      rule.check(config, ctx)


# ------------------------------------------------------------------- codi_jax.evaluate flags

_OPT_STR = Str(optional=True)

EVAL: dict[str, Rule] = {
  "workdir": Str(optional=True, doc="a finished run"),
  "official": Str(optional=True, doc="an official-layout checkpoint"),
  "base": Str(optional=True, doc="with --official: the base model's HF directory"),
  "sets": Seq(Str(nonempty=True), doc="evaluation sets"),
  "data_dir": Str(doc="folder of the named sets' files"),
  "set_path": Seq(Str(nonempty=True), doc="NAME=FILE entries"),
  "mode": Enum(ref("codi_jax.eval_lib", "MODES"), doc="decoding mode"),
  "cot_workdir": Str(optional=True, doc="a CoT-SFT run for the efficiency report"),
  "efficiency": Bool(doc="write the efficiency report"),
  "batch_size": Int(1, optional=True, doc="evaluation batch"),
  "max_new_tokens": Int(1, optional=True, doc="decoding cap"),
  "num_latent": Int(0, optional=True, doc="thoughts at inference"),
  "padding_mode": Enum(literal("codi_jax.models.positions", "PaddingMode"), optional=True),
  "lora_rank": Int(0, optional=True, doc="with --official: expected LoRA rank"),
  "lora_alpha": Num(gt=0, optional=True, doc="with --official: LoRA alpha"),
  "dtype": Enum(("float32", "bfloat16"), optional=True, doc="with --official: dtype"),
  "limit": Int(1, optional=True, doc="first N examples per set"),
  "out": Str(optional=True, doc="output directory"),
  "mask_special": Enum(("all", "eot_only"), doc="never emit pad/bot/eot, or only eot"),
  "probe": Bool(doc="decode each thought through the LM head"),
  "probe_topk": Int(1, doc="decoded tokens per probed vector"),
  "probe_source": Enum(("pre_prj", "post_prj"), doc="probed vectors"),
  "probe_all": Bool(doc="probe every problem"),
  "latency_calls": Int(1, doc="timed calls per latency figure"),
  "progress": Bool(doc="progress bars"),
  "allow_extrapolation": Bool(doc="decode past a RoPE model's positions"),
  "overwrite": Bool(doc="replace results already in --out"),
}


# ------------------------------------------------------------------------ soft-thinking CLIs

_INT32 = {"hi": INT32_MAX}

SAMPLER: dict[str, Rule] = {
  "mode": Enum(ref("soft_jax.sampling", "MODES"), doc="decoding mode"),
  "temperature": Num(ge=0, doc="thinking temperature; 0 = argmax"),
  "top_k": Int(0, doc="thinking top-k; 0 = off"),
  "top_p": Num(gt=0, le=1, doc="thinking top-p"),
  "min_p": Num(ge=0, lt=1, doc="thinking min-p"),
  "max_topk": Int(1, doc="K: tokens mixed into a concept token"),
  "dirichlet_alpha": Num(gt=0, doc="Dirichlet gamma"),
  "gumbel_tau": Num(gt=0, doc="Gumbel-Softmax temperature"),
  "after_temperature": Num(ge=0, optional=True, doc="answer temperature; None = thinking's"),
  "after_top_k": Int(0, doc="answer top-k; 0 = off"),
  "after_top_p": Num(gt=0, le=1, doc="answer top-p"),
  "after_min_p": Num(ge=0, lt=1, doc="answer min-p"),
  "cold_stop_entropy": Num(ge=0, doc="Cold Stop theta; 0 = off"),
  "cold_stop_patience": Int(1, **_INT32, doc="Cold Stop patience P"),
  "entropy_normalized": Bool(doc="entropy / ln V"),
  "max_thinking_tokens": Int(0, **_INT32, doc="thinking budget; 0 = off"),
  "answer_phase": Enum(ref("soft_jax.sampling", "ANSWER_PHASES"), doc="answer phase"),
  "answer_low_entropy_abort": Bool(doc="abort rows on P low-entropy answer steps"),
  "embed_mix_dtype": Enum(ref("soft_jax.sampling", "EMBED_MIX_DTYPES"), doc="mixture dtype"),
}

# A preset's fields (configs/soft/*.py); each top-level one is also the flag of the same name.
SOFT: dict[str, Rule] = {
  "model": Str(nonempty=True, doc="alias, HF directory, .gguf file or hub id"),
  "mode": SAMPLER["mode"],
  "chat": Bool(doc="wrap prompts in the chat template"),
  "dtype": Enum(("float32", "bfloat16"), doc="compute and parameter dtype"),
  "max_new_tokens": Int(1, **_INT32, doc="one budget for thinking + answer"),
  "length_bucket": Int(1, **_INT32, doc="prompt lengths padded to a multiple of this"),
  "seed": Int(0, INT32_MAX, doc="sampling seed"),
  "mesh": Custom(
    _mesh_text_ok,
    "'' (one device) or data,fsdp,tensor: integers >= 1, one of them may be -1",
    doc="device mesh",
  ),
  "logical_axis_rules": _AXIS_RULES,
  "think_end": Str(nonempty=True, doc="auto | none | the `</think>` text"),
  "think_end_last_id": Bool(doc="the last id of a multi-token think_end"),
  **{f"sampler.{name}": rule for name, rule in SAMPLER.items() if name != "mode"},
}

# The soft CLIs' other flags (checked when the program defines them).
SOFT_FLAGS: dict[str, Rule] = {
  "config": Str(optional=True, doc="preset file[:variant[,benchmark]]"),
  "prompt": Seq(
    Str(nonempty=True), nonempty=True, optional=True, doc="prompts (generate needs one)"
  ),
  "json": Bool(doc="end stdout with one JSON line"),
  "allow_extrapolation": Bool(doc="decode past a RoPE model's positions"),
  "data": Str(nonempty=True, doc="problem file or hub dataset id"),
  "layout": Enum(ref("soft_jax.problems", "LAYOUTS"), doc="problem fields"),
  "question_field": Str(nonempty=True, optional=True),
  "answer_field": Str(nonempty=True, optional=True),
  "id_field": Str(nonempty=True, optional=True),
  "limit": Int(1, optional=True, doc="first N problems"),
  "n_samples": Int(1, **_INT32, doc="samples per problem"),
  "k": Seq(Custom(lambda v: int(str(v).strip()) >= 1, "an integer >= 1"), nonempty=True),
  "batch_size": Int(1, **_INT32, doc="rows per decoder call"),
  "judge": Enum(ref("soft_jax.math_answers", "JUDGES"), doc="answer checker"),
  "out": Str(nonempty=True, doc="output directory"),
  "overwrite": Bool(doc="replace results already in --out"),
  "progress": Bool(doc="progress bar"),
}


@functools.cache
def soft_flag_rules() -> dict[str, Rule]:
  """Every soft-CLI flag's rule: the preset's top-level fields, the sampler knobs, the rest."""
  top = {k: v for k, v in SOFT.items() if "." not in k}
  return {**top, **SAMPLER, **SOFT_FLAGS, "after_temperature": SAMPLER["after_temperature"]}
