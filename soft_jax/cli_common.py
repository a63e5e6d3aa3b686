"""Flags and config plumbing shared by the soft_jax command lines (generate, evaluate, analyze).

Defines (once per process) --model, --prompt, --data (and its layout/field/limit flags),
--n_samples, --out, --progress, --mesh, --max_new_tokens, --dtype, --length_bucket, --config, --mode,
--seed, --think_end, --think_end_last_id and one flag per SamplerParams knob. A flag given on the
command line wins over the --config file, which wins over the flag default; sampler knobs given
nowhere take the SamplerParams defaults (spec section 5). Bad values raise InputError naming the
flag.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import flags
from ml_collections import config_flags

from codi_jax.errors import InputError

MODEL = flags.DEFINE_string("model", "smollm2", "Alias, HF directory, .gguf file or hub id.")
MAX_NEW = flags.DEFINE_integer(
  "max_new_tokens", 32, "Tokens to generate at most (stop id included)."
)
DTYPE = flags.DEFINE_enum(
  "dtype", "float32", ["float32", "bfloat16"], "Compute and parameter dtype."
)
BUCKET = flags.DEFINE_integer(
  "length_bucket", 32, "Prompt lengths are padded up to a multiple of this."
)
CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Optional configs/soft/*.py[:variant] file."
)
MODE = flags.DEFINE_string(
  "mode", None, "greedy | sample | soft | dirichlet | gumbel (default greedy)."
)
SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default 0); same seed, same output.")
THINK_END = flags.DEFINE_string(
  "think_end", None, "`</think>` text: auto (a single `</think>` token if any) | none | a token."
)
THINK_END_LAST_ID = flags.DEFINE_bool(
  "think_end_last_id", None, "Use the last id of a multi-token --think_end (official rule)."
)
PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).")
DATA = flags.DEFINE_string("data", None, "Problems: a .jsonl/.json file or a hub dataset id.")
LAYOUT = flags.DEFINE_string("layout", "auto", "gsm8k | math500 | aime | softthinking | auto.")
QUESTION_FIELD = flags.DEFINE_string(
  "question_field", None, "Overrides the layout's question field."
)
ANSWER_FIELD = flags.DEFINE_string("answer_field", None, "Overrides the layout's answer field.")
ID_FIELD = flags.DEFINE_string("id_field", None, "Overrides the layout's id field.")
LIMIT = flags.DEFINE_integer("limit", None, "Use only the first N problems.")
N_SAMPLES = flags.DEFINE_integer("n_samples", 1, "Samples per problem / prompt.")
OUT = flags.DEFINE_string("out", None, "Output directory.")
PROGRESS = flags.DEFINE_bool("progress", True, "Show a tqdm progress bar on stderr.")
MESH = flags.DEFINE_string(
  "mesh",
  None,
  "Device mesh data,fsdp,tensor (one may be -1), e.g. 1,1,-1 for tensor parallelism "
  "over every device; empty: one device.",
)
# Sampler flags: None = the config's value, else the SamplerParams default (spec section 5).
SAMPLER_FLAGS = {
  "temperature": flags.DEFINE_float("temperature", None, "Thinking temperature (0 = argmax)."),
  "top_k": flags.DEFINE_integer("top_k", None, "Thinking top-k (0 = off)."),
  "top_p": flags.DEFINE_float("top_p", None, "Thinking top-p, in (0, 1]."),
  "min_p": flags.DEFINE_float("min_p", None, "Thinking min-p, in [0, 1)."),
  "max_topk": flags.DEFINE_integer("max_topk", None, "K: tokens mixed into a concept token."),
  "dirichlet_alpha": flags.DEFINE_float("dirichlet_alpha", None, "Dirichlet gamma (> 0)."),
  "gumbel_tau": flags.DEFINE_float("gumbel_tau", None, "Gumbel-Softmax temperature (> 0)."),
  "after_temperature": flags.DEFINE_string(
    "after_temperature", None, "Answer-phase temperature, or `thinking` to reuse --temperature."
  ),
  "after_top_k": flags.DEFINE_integer("after_top_k", None, "Answer-phase top-k (0 = off)."),
  "after_top_p": flags.DEFINE_float("after_top_p", None, "Answer-phase top-p."),
  "after_min_p": flags.DEFINE_float("after_min_p", None, "Answer-phase min-p."),
  "cold_stop_entropy": flags.DEFINE_float("cold_stop_entropy", None, "Cold Stop theta (0 = off)."),
  "cold_stop_patience": flags.DEFINE_integer("cold_stop_patience", None, "Cold Stop patience P."),
  "entropy_normalized": flags.DEFINE_bool("entropy_normalized", None, "Entropy / ln V ([SST])."),
  "max_thinking_tokens": flags.DEFINE_integer(
    "max_thinking_tokens", None, "Thinking budget incl. the forced `</think>` (0 = off)."
  ),
  "answer_phase": flags.DEFINE_string("answer_phase", None, "sample | legacy_argmax."),
  "answer_low_entropy_abort": flags.DEFINE_bool(
    "answer_low_entropy_abort", None, "Abort rows on P low-entropy answer steps (HEAD only)."
  ),
  "embed_mix_dtype": flags.DEFINE_string("embed_mix_dtype", None, "float32 | model."),
}


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
  """Prompt ids as fed to the model, after the chat template if asked."""
  if chat:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
  return tokenizer.encode(text, add_special_tokens=True)


def _after_temperature(value):
  """--after_temperature: a number, or `thinking` (None: reuse the thinking temperature)."""
  if value is None or value == "thinking" or isinstance(value, (int, float)):
    return None if value == "thinking" else value
  try:
    return float(value)
  except ValueError:
    raise InputError(
      f"--after_temperature: expected a number or 'thinking', got {value!r}"
    ) from None


def sampler_params(mode: str, config=None, overrides: dict | None = None):
  """SamplerParams from the defaults, then config.sampler, then explicit flag values; validated."""
  from soft_jax.sampling import SamplerParams  # pylint: disable=import-outside-toplevel

  values = {"mode": mode}
  if config is not None and "sampler" in config:
    values.update(config.sampler.to_dict())
  values.update({k: v for k, v in (overrides or {}).items() if v is not None})
  values["mode"] = mode
  known = {f.name for f in dataclasses.fields(SamplerParams)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise InputError(f"--config: unknown sampler field(s): {', '.join(unknown)}")
  if "after_temperature" in values:
    values["after_temperature"] = _after_temperature(values["after_temperature"])
  return SamplerParams(**values).validate(prefix="--")


def setting(name: str, config, flag_value):
  """A flag given on the command line wins over the config, which wins over the flag default."""
  if config is not None and not flags.FLAGS[name].present and name in config:
    return config[name]
  return flag_value


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the shared flags and --config resolve to."""

  model: str
  max_new_tokens: int
  dtype: str
  length_bucket: int
  mode: str
  params: Any  # SamplerParams, validated
  seed: int
  think_end: str
  think_end_last_id: bool
  config: Any  # the ConfigDict or None
  mesh: Any = None  # jax Mesh or None (one device)


def make_mesh(text: str | None):
  """--mesh "data,fsdp,tensor" -> an Auto mesh over every device, or None for ""."""
  if not text:
    return None
  from codi_jax import sharding  # pylint: disable=import-outside-toplevel

  try:
    sizes = [int(x) for x in text.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != 3:
    raise InputError(
      f"--mesh: expected three integers data,fsdp,tensor (one may be -1), got {text!r}"
    )
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, sizes)), where="--mesh")


def settings(default_mode: str = "greedy") -> Settings:
  """Resolves the shared flags against --config (call inside `exit_on_input_error`)."""
  cfg = CONFIG.value
  mode = MODE.value or (cfg.mode if cfg is not None and "mode" in cfg else default_mode)
  params = sampler_params(mode, cfg, {k: f.value for k, f in SAMPLER_FLAGS.items()})
  think_end = THINK_END.value
  if think_end is None:
    think_end = cfg.get("think_end", "auto") if cfg is not None else "auto"
  last_id = THINK_END_LAST_ID.value
  if last_id is None:
    last_id = bool(cfg.get("think_end_last_id", False)) if cfg is not None else False
  seed = SEED.value if SEED.value is not None else (cfg.get("seed", 0) if cfg is not None else 0)
  return Settings(
    setting("model", cfg, MODEL.value),
    setting("max_new_tokens", cfg, MAX_NEW.value),
    setting("dtype", cfg, DTYPE.value),
    setting("length_bucket", cfg, BUCKET.value),
    mode,
    params,
    int(seed),
    think_end,
    bool(last_id),
    cfg,
    make_mesh(setting("mesh", cfg, MESH.value)),
  )
