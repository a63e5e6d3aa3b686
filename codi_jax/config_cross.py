"""The training config's cross-field rules (`CROSS_TRAIN`, checked last by
`train_options.validate_train`) and the `train_bpe` tokenizer spec that one of them and the
tokenizer field's rule both read.
"""

from __future__ import annotations

import math

from codi_jax.config_rules import Context, Cross, fail
from codi_jax.errors import InputError


def train_bpe_spec(spec: str) -> tuple[int, bool] | None:
  """(vocab size, split digits) of `train_bpe[:<vocab>[:numbers]]`; None for any other string."""
  parts = spec.split(":")
  if parts[0] != "train_bpe" or len(parts) > 3 or (len(parts) > 1 and not parts[1].isdigit()):
    return None
  if len(parts) == 3 and parts[2] != "numbers":
    return None
  return (int(parts[1]) if len(parts) > 1 else 512), len(parts) < 3


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
  if codi["coconut_start_stage"] > codi["max_latent_stage"]:
    top = codi["max_latent_stage"]
    fail("codi.coconut_start_stage", codi["coconut_start_stage"], f"<= max_latent_stage={top}")


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
    (
      "codi.method",
      "codi.stage_steps",
      "codi.epochs_per_stage",
      "codi.coconut_start_stage",
      "codi.max_latent_stage",
    ),
    _coconut_stages,
    "coconut: a stage lasts at least one step; the start stage is at most max_latent_stage",
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
