"""Every config field's rule in one place, and the validation pass each entry point runs first.

A rule is declared per field path, beside nothing else:

    "optim.lr": Num(gt=0, doc="peak learning rate"),
    "codi.method": Enum(_ref("codi_jax.codi.model", "METHODS"), doc="training method"),

`Int`, `Num`, `Bool`, `Str`, `Enum`, `Seq` and `Custom` build a `Rule` (type, range or choices,
doc); rules whose allowed values live in another module name them lazily (`_ref`), so the
choices have one owner. Cross-field rules are `Cross` entries in `CROSS_TRAIN`.

- `validate_train(config)`: a training config (configs/*.py) against `TRAIN`: unknown and
  missing keys, each value's type and range, then `CROSS_TRAIN`. `train_lib.train_and_evaluate`
  runs it before anything else; `codi_jax.evaluate` runs it on a `--config` override.
- `EVAL`: the flags of `codi_jax.evaluate` (`eval_lib.Options.check`).
- `SOFT`: a soft-thinking preset's fields, which are also the soft CLIs' flags of the same names;
  `SOFT_FLAGS`: their other flags; `SAMPLER`: the sampler knobs (`SamplerParams.validate`).

The first failure raises one InputError line naming the field, the value and what is allowed:
`--config.optim.lr: got -1.0; expected a number > 0`.

Over 400 lines on purpose: one place declares every rule (the point of this module); most of its
length is the rule table itself, one line per config field.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import math
import numbers
import typing
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from codi_jax.errors import InputError

INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------------------ rules


def _ref(module: str, name: str) -> Callable[[], tuple]:
  """Lazily the tuple (or a dict's keys) `module.name`: the choices keep their one owner."""

  def get():
    value = getattr(importlib.import_module(module), name)
    return tuple(value) if not isinstance(value, Mapping) else tuple(sorted(value))

  return get


def _literal(module: str, name: str, field: str | None = None) -> Callable[[], tuple]:
  """Lazily the values of the `Literal[...]` alias `module.name`, or of its field's annotation."""

  def get():
    owner = getattr(importlib.import_module(module), name)
    return typing.get_args(typing.get_type_hints(owner)[field] if field else owner)

  return get


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one field may hold: a kind (int, num, bool, str, enum, seq, custom) and its bounds."""

  kind: str
  doc: str = ""
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  inf: bool = False  # num: +inf allowed
  f32: bool = False  # num: used on the device, so the bounds hold once rounded to float32
  choices: tuple | Callable[[], tuple] = ()  # enum
  nonempty: bool = False  # str, seq
  optional: bool = False  # None allowed ("not given")
  item: Rule | None = None  # seq: each item's rule
  check: Callable[[Any], bool] | None = None  # custom: True if the value is fine
  allowed_text: str = ""  # custom: what is allowed

  def options(self) -> tuple:
    return self.choices() if callable(self.choices) else tuple(self.choices)

  def allowed(self) -> str:
    """What the field may hold, for people."""
    text = {
      "int": "an integer",
      "num": "a number" if not self.inf else "a number or inf",
      "bool": "True or False",
      "str": "a non-empty string" if self.nonempty else "a string",
    }.get(self.kind)
    if self.kind == "enum":
      text = "one of " + ", ".join(str(c) for c in self.options())
    elif self.kind == "seq":
      what = "a non-empty list" if self.nonempty else "a list"
      text = f"{what} whose items are each {self.item.allowed()}" if self.item else what
    elif self.kind == "custom":
      text = self.allowed_text
    if self.kind in ("int", "num"):
      text += self._range()
    return text + (" (or None)" if self.optional else "")

  def refusal(self, value) -> str:
    """`allowed()`, saying why when only float32 rounding (what the device sees) breaks the rule."""
    text = self.allowed()
    if self.f32 and _is_num(value) and math.isfinite(value) and self._in_range(value):
      text += f" (as float32 the device sees {float(np.float32(value))!r})"
    return text

  def _range(self) -> str:
    lo, hi = _fmt(self.lo), _fmt(self.hi)
    if self.lo is not None and self.hi is not None:
      return f" in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
    if self.lo is not None:
      return f" {'>' if self.lo_open else '>='} {lo}"
    if self.hi is not None:
      return f" {'<' if self.hi_open else '<='} {hi}"
    return ""

  def ok(self, value) -> bool:
    """Whether `value` satisfies the rule."""
    if value is None:
      return self.optional
    if self.kind == "int":
      return _is_int(value) and self._in_range(value)
    if self.kind == "num":
      if not _is_num(value) or math.isnan(value):
        return False
      if math.isinf(value) and not (self.inf and value > 0):
        return False
      if self.f32 and math.isfinite(value):
        if abs(value) > _F32_MAX:
          return False
        # As given and as the device sees it: 1 - 1e-10 is 1.0 there, 1e-300 is 0.0.
        return self._in_range(value) and self._in_range(float(np.float32(value)))
      return self._in_range(value)
    if self.kind == "bool":
      return isinstance(value, bool)
    if self.kind == "str":
      return isinstance(value, str) and (bool(value) or not self.nonempty)
    if self.kind == "enum":
      return isinstance(value, str | int | float) and any(
        value == c and type(value) is type(c) for c in self.options()
      )
    if self.kind == "seq":
      if not isinstance(value, list | tuple) or (self.nonempty and not value):
        return False
      return self.item is None or all(self.item.ok(v) for v in value)
    if self.kind == "custom":
      try:
        return bool(self.check(value))
      except (TypeError, ValueError, AttributeError, IndexError, KeyError, OverflowError):
        return False
    raise ValueError(f"unknown rule kind {self.kind!r}")

  def _in_range(self, v) -> bool:
    if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
      return False
    return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))


_F32_MAX = float(np.finfo(np.float32).max)


def _fmt(x) -> str:
  return "inf" if x == math.inf else f"{x:g}" if isinstance(x, float) else str(x)


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def Int(lo=None, hi=None, *, doc="", optional=False) -> Rule:  # noqa: N802  (a rule constructor)
  return Rule("int", doc, lo=lo, hi=hi, optional=optional)


def Num(  # noqa: N802
  *, ge=None, gt=None, le=None, lt=None, inf=False, f32=True, doc="", optional=False
) -> Rule:
  """A real number (not bool), finite unless `inf`; `f32` (default): the bounds hold for the
  float32 the device computes with (host-only knobs pass f32=False)."""
  lo, hi = (gt, ge)[gt is None], (lt, le)[lt is None]
  return Rule(
    "num", doc, lo=lo, hi=hi, lo_open=gt is not None, hi_open=lt is not None, inf=inf, f32=f32,
    optional=optional,
  )  # fmt: skip


def Bool(*, doc="") -> Rule:  # noqa: N802
  return Rule("bool", doc)


def Str(*, doc="", nonempty=False, optional=False) -> Rule:  # noqa: N802
  return Rule("str", doc, nonempty=nonempty, optional=optional)


def Enum(choices, *, doc="", optional=False) -> Rule:  # noqa: N802
  return Rule("enum", doc, choices=choices, optional=optional)


def Seq(item: Rule | None = None, *, doc="", nonempty=False, optional=False) -> Rule:  # noqa: N802
  return Rule("seq", doc, item=item, nonempty=nonempty, optional=optional)


def Custom(check: Callable[[Any], bool], allowed: str, *, doc="", optional=False) -> Rule:  # noqa: N802
  return Rule("custom", doc, check=check, allowed_text=allowed, optional=optional)


# ------------------------------------------------------------------------------- value checks


def train_bpe_spec(spec: str) -> tuple[int, bool] | None:
  """(vocab size, split digits) of `train_bpe[:<vocab>[:numbers]]`; None for any other string."""
  parts = spec.split(":")
  if parts[0] != "train_bpe" or len(parts) > 3 or (len(parts) > 1 and not parts[1].isdigit()):
    return None
  if len(parts) == 3 and parts[2] != "numbers":
    return None
  return (int(parts[1]) if len(parts) > 1 else 512), len(parts) < 3


def _tokenizer_ok(v) -> bool:
  if v in ("model", "gpt2"):
    return True
  bpe = train_bpe_spec(v)
  return bpe is not None and (v == "train_bpe" or 257 <= bpe[0] <= 10**7)


def _mesh_size_ok(v) -> bool:
  return _is_int(v) and (v == -1 or 1 <= v <= 1 << 20)


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
  "model.arch": Enum(_ref("codi_jax.models.config", "ARCHS"), doc="architecture (from scratch)"),
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
    _literal("codi_jax.models.config", "AttentionImpl"), doc="attention kernel"
  ),
  "model.scan_layers": Bool(doc="one lax.scan over stacked layers (False: unrolled)"),
  "model.lora_rank": Int(0, doc="0 = full fine-tuning"),
  "model.lora_alpha": Num(gt=0, doc="LoRA scale alpha / rank"),
  "model.lora_dropout": Num(**_DROPOUT, doc="LoRA input dropout"),
  # Method.
  "codi.method": Enum(_ref("codi_jax.codi.model", "METHODS"), doc="training method"),
  "codi.num_latent": Int(0, doc="continuous thoughts in training"),
  "codi.num_latent_infer": Int(-1, doc="thoughts at inference; -1 = num_latent"),
  "codi.prj_dim": Int(0, doc="projection width; 0 = d_model"),
  "codi.use_prj": Bool(doc="feed thoughts through the projection"),
  "codi.prj_layernorm": Bool(doc="layer norm after the projection"),
  "codi.prj_dropout": Num(**_DROPOUT, doc="projection dropout"),
  "codi.distill_loss": Enum(
    _literal("codi_jax.codi.model", "CodiOptions", "distill_loss"), doc="distillation loss"
  ),
  "codi.distill_layers": Enum(
    _literal("codi_jax.codi.model", "CodiOptions", "distill_layers"), doc="distilled layers"
  ),
  "codi.distill_div_std": Bool(doc="divide the distillation loss by the teacher's std"),
  "codi.alpha": Num(ge=0, doc="student CE weight"),
  "codi.beta": Num(ge=0, doc="distillation weight"),
  "codi.gamma": Num(ge=0, doc="teacher CE weight"),
  "codi.padding_mode": Enum(
    _literal("codi_jax.models.positions", "PaddingMode"), doc="padded questions"
  ),
  "codi.separate_teacher_target_pass": Bool(doc="reference: run the teacher twice"),
  "codi.remat_thoughts": Bool(doc="recompute the thought scan in the backward pass"),
  "codi.remat_teacher": Bool(doc="recompute each teacher-pass block in the backward pass"),
  "codi.remat_policy": Enum(
    _literal("codi_jax.models.layers", "RematPolicy"), doc="what remat keeps"
  ),
  "codi.train_special_embeddings": Bool(doc="train the pad/bot/eot rows under LoRA"),
  "codi.ce_chunk_logits": Int(0, INT32_MAX, doc="logits per fused LM-head + CE chunk; 0 = whole"),
  "codi.c_thought": Int(1, doc="Coconut: thoughts per replaced step"),
  "codi.max_latent_stage": Int(0, doc="Coconut: stages replacing steps one by one"),
  "codi.epochs_per_stage": Int(0, doc="Coconut: stage length in epochs"),
  "codi.stage_steps": Int(0, doc="Coconut: stage length in steps; 0 = epochs_per_stage"),
  "codi.pad_latent_to_max": Bool(doc="Coconut: all thoughts past the last stage"),
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
    _ref("codi_jax.data.curriculum", "RESETS"), doc="baselines: optimizer restarts"
  ),
  # Data.
  "data.source": Enum(
    lambda: ("synthetic", "multiplication", *_ref("codi_jax.data.readers", "TRAIN_SETS")()),
    doc="training set",
  ),
  "data.path": Str(doc="local file or folder, else the source's hub id"),
  "data.valid_path": Str(doc="validation file; '' = a hold-out"),
  "data.valid_size": Int(1, doc="hold-out size (at most a tenth of the data)"),
  "data.format": Enum(_ref("codi_jax.data.sources", "FORMATS"), doc="jsonl | tfds"),
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
    Enum(_ref("codi_jax.data.synthetic", "OPS")), nonempty=True, doc="operators"
  ),
  "data.synthetic.style": Enum(_ref("codi_jax.data.synthetic", "_STYLES"), doc="wording"),
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
    lambda v: _is_int(v) and (v == 0 or 2 <= v <= INT32_MAX),
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


# -------------------------------------------------------------------------- cross-field rules


@dataclasses.dataclass(frozen=True)
class Cross:
  """A rule over several fields: `check(config, ctx)` raises through `fail`."""

  name: str
  fields: tuple[str, ...]  # the fields it reads (its error names one of them)
  check: Callable[[Any, Context], None]
  doc: str


@dataclasses.dataclass(frozen=True)
class Context:
  """What a config is checked against: the devices, processes and backend of this job."""

  devices: int = 1
  processes: int = 1
  platform: str = "cpu"  # jax.default_backend()


def fail(path: str, value, allowed: str, prefix: str = "--config."):
  raise InputError(f"{prefix}{path}: got {_show(value)}; expected {allowed}")


def _show(value) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def _get(config, path: str):
  for part in path.split("."):
    config = config[part]
  return config


def _mesh_devices(c, ctx: Context):
  from codi_jax import sharding  # pylint: disable=import-outside-toplevel

  sizes = dict(c["mesh"])
  try:
    sharding.mesh_shape(sizes, ctx.devices)
  except InputError:
    fail("mesh", sizes, f"sizes using all {ctx.devices} devices, at most one of them -1")


def _data_parallel(c, ctx: Context) -> int:
  from codi_jax import sharding  # pylint: disable=import-outside-toplevel

  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(dict(c["mesh"]), ctx.devices)))
  rules = sharding.rules_from_config(c["logical_axis_rules"])
  return math.prod(shape[a] for a in rules.get("batch", ()))


def _batch_divides(c, ctx: Context):
  split, b = _data_parallel(c, ctx), c["data"]["batch_size"]
  if b % split or b % ctx.processes:
    fail(
      "data.batch_size",
      b,
      f"a multiple of the {split} data-parallel devices (the mesh axes of the `batch` rule) "
      f"and of the {ctx.processes} processes",
    )


def _steps_or_epochs(c, ctx: Context):
  o = c["optim"]
  if o["num_steps"] == 0 and o["epochs"] == 0:
    fail("optim.epochs", o["epochs"], "> 0 when optim.num_steps = 0 (nothing to train)")


def _scratch_heads(c, ctx: Context):
  m = c["model"]
  if m["spec"]:
    return
  d, h, k = m["d_model"], m["num_heads"], m["num_kv_heads"]
  if d % h:
    fail("model.num_heads", h, f"a divisor of model.d_model={d}")
  if k and h % k:
    fail("model.num_kv_heads", k, f"0 or a divisor of model.num_heads={h}")
  if m["arch"] == "gpt2" and k not in (0, h):
    fail("model.num_kv_heads", k, f"0 or {h} (GPT-2 has no grouped-query attention)")
  if m["arch"] != "gpt2" and (d // h) % 2:
    fail("model.num_heads", h, f"a divisor leaving an even head size for RoPE (d_model={d})")


def _scratch_tokenizer(c, ctx: Context):
  m, tok = c["model"], c["tokenizer"]
  if not m["spec"] and tok == "model":
    fail("tokenizer", tok, "gpt2 or train_bpe[:<vocab>] for a model trained from scratch")
  if m["spec"] or not m["vocab_size"]:
    return
  need = 50257 if tok == "gpt2" else train_bpe_spec(tok)[0]
  if m["vocab_size"] < need:
    fail("model.vocab_size", m["vocab_size"], f"0 or >= {need}, the size of tokenizer {tok}")


def _inference_thoughts(codi) -> int:
  """Thoughts the student decodes with (`CodiOptions.from_config(..., inference=True)`)."""
  method = codi["method"]
  if method in ("no_cot_sft", "icot_si", "cot_sft"):
    return 0
  if codi["num_latent_infer"] >= 0:
    return codi["num_latent_infer"]
  if method == "coconut":
    return codi["max_latent_stage"] * codi["c_thought"]
  return codi["num_latent"]


def _scratch_positions(c, ctx: Context):
  m, e, codi = c["model"], c["eval"], c["codi"]
  if m["spec"]:
    return
  thoughts = _inference_thoughts(codi)
  room = m["max_positions"] - thoughts - 3  # a question token, bot, eot
  fits = (
    "a question token, <bot>, the thoughts, <eot> and an answer token must fit "
    f"model.max_positions={m['max_positions']} (or raise it)"
  )
  if room < 1 and thoughts and m["max_positions"] >= 5:  # the thoughts leave no room at all
    most = m["max_positions"] - 4
    if codi["num_latent_infer"] >= 0:
      fail("codi.num_latent_infer", thoughts, f"<= {most}: {fits}")
    if codi["method"] == "coconut":
      fail(
        "codi.max_latent_stage",
        codi["max_latent_stage"],
        f"max_latent_stage x c_thought ({thoughts} thoughts) <= {most}: {fits}",
      )
    fail("codi.num_latent", thoughts, f"<= {most}: {fits}")
  if room < 1:
    fail("model.max_positions", m["max_positions"], f">= {thoughts + 4}: {fits}")
  if e["max_new_tokens"] > room:
    fail(
      "eval.max_new_tokens",
      e["max_new_tokens"],
      f"<= {max(room, 0)}: a question token, <bot>, the thoughts, <eot> and the answer must fit "
      f"model.max_positions={m['max_positions']}",
    )


def _thoughtless(c, ctx: Context):
  codi = c["codi"]
  if codi["method"] in ("cot_sft", "no_cot_sft", "icot_si") and codi["num_latent_infer"] > 0:
    fail(
      "codi.num_latent_infer",
      codi["num_latent_infer"],
      f"-1 or 0: method {codi['method']} decodes without continuous thoughts",
    )


def _cudnn_attention(c, ctx: Context):
  m = c["model"]
  if m["attention_impl"] != "cudnn":
    return
  if m["dtype"] not in ("bfloat16", "float16"):
    fail("model.dtype", m["dtype"], "bfloat16 or float16 with model.attention_impl=cudnn")
  if ctx.platform != "gpu":
    fail(
      "model.attention_impl",
      "cudnn",
      f"xla or dot_product on this {ctx.platform} backend (cudnn needs a GPU)",
    )


def _coconut_stages(c, ctx: Context):
  codi = c["codi"]
  if codi["method"] == "coconut" and codi["stage_steps"] < 1 and codi["epochs_per_stage"] < 1:
    fail("codi.stage_steps", codi["stage_steps"], ">= 1 (or codi.epochs_per_stage >= 1)")


def _synthetic_ranges(c, ctx: Context):
  s = c["data"]["synthetic"]
  if s["min_steps"] > s["max_steps"]:
    fail("data.synthetic.min_steps", s["min_steps"], f"<= max_steps={s['max_steps']}")
  if s["min_operand"] > s["max_operand"]:
    fail("data.synthetic.min_operand", s["min_operand"], f"<= max_operand={s['max_operand']}")
  if s["max_operand"] > s["max_value"]:
    fail("data.synthetic.max_operand", s["max_operand"], f"<= max_value={s['max_value']}")


def _multiplication_pairs(c, ctx: Context):
  d = c["data"]
  if d["source"] != "multiplication":
    return
  m = d["multiplication"]
  pairs = (9 * 10 ** (m["digits"] - 1)) ** 2
  asked = m["train"] + (0 if d["path"] else m["valid"] + m["test"])
  if asked > pairs:
    fail(
      "data.multiplication.train",
      m["train"],
      f"train + valid + test <= {pairs}, the distinct {m['digits']}-digit pairs",
    )


def _tfds_source(c, ctx: Context):
  d = c["data"]
  if d["format"] != "tfds":
    return
  if d["source"] not in ("gsm8k-aug", "gsm8k-aug-nl"):
    fail("data.source", d["source"], "gsm8k-aug or gsm8k-aug-nl with data.format=tfds")
  if not d["tfds_data_dir"] or "://" in d["tfds_data_dir"]:
    fail("data.tfds_data_dir", d["tfds_data_dir"], "a local or mounted TFDS data_dir (no URL)")


# Validation modes per method (as train_lib._MODES); "auto" picks the first.
_VALID_MODES = {
  "codi": ("student", "teacher"),
  "cot_sft": ("teacher",),
  "no_cot_sft": ("student",),
  "coconut": ("student",),
  "icot_si": ("teacher",),
}


def _best_metric(c, ctx: Context):
  best = c["checkpoint"]["best_metric"]
  modes = _VALID_MODES.get(c["codi"]["method"], ())
  allowed = ("auto", "", *(f"valid/{m}_{k}" for m in modes for k in ("acc", "tokens")))
  if best not in allowed:
    fail("checkpoint.best_metric", best, "one of " + ", ".join(repr(a) for a in allowed))


CROSS_TRAIN: tuple[Cross, ...] = (
  Cross("mesh_devices", ("mesh",), _mesh_devices, "mesh sizes use every device"),
  Cross(
    "batch_divides",
    ("data.batch_size", "mesh", "logical_axis_rules"),
    _batch_divides,
    "data.batch_size is a multiple of the data-parallel devices and of the processes",
  ),
  Cross(
    "steps_or_epochs",
    ("optim.num_steps", "optim.epochs"),
    _steps_or_epochs,
    "optim.num_steps > 0 or optim.epochs > 0",
  ),
  Cross(
    "scratch_heads",
    ("model.spec", "model.d_model", "model.num_heads", "model.num_kv_heads", "model.arch"),
    _scratch_heads,
    "from scratch: num_heads divides d_model, num_kv_heads divides num_heads (GPT-2: equal), "
    "RoPE heads have an even size",
  ),
  Cross(
    "scratch_tokenizer",
    ("model.spec", "tokenizer", "model.vocab_size"),
    _scratch_tokenizer,
    "from scratch: a tokenizer of its own, and vocab_size 0 or at least the tokenizer's",
  ),
  Cross(
    "scratch_positions",
    ("model.spec", "model.max_positions", "eval.max_new_tokens", "codi"),
    _scratch_positions,
    "from scratch: validation's question, thoughts and answer fit model.max_positions",
  ),
  Cross(
    "thoughtless_methods",
    ("codi.method", "codi.num_latent_infer"),
    _thoughtless,
    "cot_sft, no_cot_sft and icot_si take num_latent_infer -1 or 0",
  ),
  Cross(
    "cudnn_attention",
    ("model.attention_impl", "model.dtype"),
    _cudnn_attention,
    "attention_impl=cudnn: a GPU backend and bf16/fp16 compute (cuDNN's fused attention)",
  ),
  Cross(
    "coconut_stages",
    ("codi.method", "codi.stage_steps", "codi.epochs_per_stage"),
    _coconut_stages,
    "coconut: a stage lasts at least one step",
  ),
  Cross(
    "synthetic_ranges",
    ("data.synthetic",),
    _synthetic_ranges,
    "synthetic: min_steps <= max_steps, min_operand <= max_operand <= max_value",
  ),
  Cross(
    "multiplication_pairs",
    ("data.source", "data.multiplication", "data.path"),
    _multiplication_pairs,
    "multiplication: the splits fit the distinct digit pairs",
  ),
  Cross(
    "tfds_source",
    ("data.format", "data.source", "data.tfds_data_dir"),
    _tfds_source,
    "format=tfds: a gsm8k-aug(-nl) source and a local data_dir",
  ),
  Cross(
    "best_metric",
    ("checkpoint.best_metric", "codi.method"),
    _best_metric,
    "checkpoint.best_metric is one the method's validation reports",
  ),
)


# ------------------------------------------------------------------------------ tree checks


def _is_group(value) -> bool:
  import ml_collections  # pylint: disable=import-outside-toplevel

  return isinstance(value, dict | ml_collections.ConfigDict)


def _groups(rules: Mapping[str, Rule]) -> set[str]:
  return {p.rsplit(".", i)[0] for p in rules for i in range(1, p.count(".") + 1)}


def check_tree(
  tree, rules: Mapping[str, Rule], *, prefix: str, complete: bool = True, only=None
) -> None:
  """Unknown keys, missing keys (if `complete`), then every field of `tree` against `rules`.

  only: field-path prefixes whose values are checked (None: all); keys are checked everywhere.
  """
  groups = _groups(rules)
  seen = set()

  def walk(node, base):
    for key, value in node.items():
      path = f"{base}{key}"
      if path in groups:
        if not _is_group(value):
          fail(path, value, "a group of fields (" + _members(rules, path) + ")", prefix)
        walk(value, path + ".")
      elif path in rules:
        seen.add(path)
        if only is None or any(path == o or path.startswith(o + ".") for o in only):
          rule = rules[path]
          if not rule.ok(value):
            fail(path, value, rule.refusal(value), prefix)
      else:
        raise InputError(f"{prefix}{path}: unknown field{_did_you_mean(path, rules, groups)}")

  walk(tree, "")
  if complete:
    missing = [p for p in rules if p not in seen]
    if missing:
      raise InputError(f"{prefix}{missing[0]}: missing (expected {rules[missing[0]].allowed()})")


def _members(rules, group: str) -> str:
  names = sorted({p[len(group) + 1 :].split(".")[0] for p in rules if p.startswith(group + ".")})
  return ", ".join(names)


def _did_you_mean(path: str, rules, groups) -> str:
  close = difflib.get_close_matches(path, [*rules, *groups], n=1, cutoff=0.75)
  if close:
    return f" (did you mean {close[0]}?)"
  group = path.rpartition(".")[0]
  known = _members(rules, group) if group else ", ".join(sorted({p.split(".")[0] for p in rules}))
  return f"; known here: {known}"


def check_values(values: Mapping[str, Any], rules: Mapping[str, Rule], *, prefix: str) -> None:
  """Each of `values` (flag name or field -> value) against its rule; KeyError for a name
  without one (every field must have a rule)."""
  for name, value in values.items():
    rule = rules[name]
    if not rule.ok(value):
      fail(name, value, rule.refusal(value), prefix)


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
  "mode": Enum(_ref("codi_jax.eval_lib", "MODES"), doc="decoding mode"),
  "cot_workdir": Str(optional=True, doc="a CoT-SFT run for the efficiency report"),
  "efficiency": Bool(doc="write the efficiency report"),
  "batch_size": Int(1, optional=True, doc="evaluation batch"),
  "max_new_tokens": Int(1, optional=True, doc="decoding cap"),
  "num_latent": Int(0, optional=True, doc="thoughts at inference"),
  "padding_mode": Enum(_literal("codi_jax.models.positions", "PaddingMode"), optional=True),
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
  "mode": Enum(_ref("soft_jax.sampling", "MODES"), doc="decoding mode"),
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
  "answer_phase": Enum(_ref("soft_jax.sampling", "ANSWER_PHASES"), doc="answer phase"),
  "answer_low_entropy_abort": Bool(doc="abort rows on P low-entropy answer steps"),
  "embed_mix_dtype": Enum(_ref("soft_jax.sampling", "EMBED_MIX_DTYPES"), doc="mixture dtype"),
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
  "layout": Enum(_ref("soft_jax.problems", "LAYOUTS"), doc="problem fields"),
  "question_field": Str(nonempty=True, optional=True),
  "answer_field": Str(nonempty=True, optional=True),
  "id_field": Str(nonempty=True, optional=True),
  "limit": Int(1, optional=True, doc="first N problems"),
  "n_samples": Int(1, **_INT32, doc="samples per problem"),
  "k": Seq(Custom(lambda v: int(str(v).strip()) >= 1, "an integer >= 1"), nonempty=True),
  "batch_size": Int(1, **_INT32, doc="rows per decoder call"),
  "judge": Enum(_ref("soft_jax.math_answers", "JUDGES"), doc="answer checker"),
  "out": Str(nonempty=True, doc="output directory"),
  "overwrite": Bool(doc="replace results already in --out"),
  "progress": Bool(doc="progress bar"),
}


@functools.cache
def soft_flag_rules() -> dict[str, Rule]:
  """Every soft-CLI flag's rule: the preset's top-level fields, the sampler knobs, the rest."""
  top = {k: v for k, v in SOFT.items() if "." not in k}
  return {**top, **SAMPLER, **SOFT_FLAGS, "after_temperature": SAMPLER["after_temperature"]}
