"""Flags and config plumbing shared by the soft_jax command lines (generate, evaluate, analyze).

Each CLI calls `define(...)` for the flag groups it uses when it runs as a program. This module
disclaims its flags, so absl files them under the calling program: `--help` lists every flag of
that program once (importing a CLI module defines nothing, so the modules can import each other).

One config mechanism, as training's: `--config=configs/soft/<model>.py[:variant[,benchmark]]` is an
ml_collections config file and `--config.<field>=<value>` overrides any of its fields (e.g.
`--config.sampler.temperature=0.7`). The short flags (`--temperature`, `--model`, ...) are aliases
of the preset field of the same name, resolved in one place (`setting` / `sampler_params`): a flag
given on the command line wins over the preset (overrides included), which wins over the flag
default; sampler knobs given nowhere take the SamplerParams defaults (docs/soft_thinking.md,
defaults). Bad values raise InputError naming the flag or field.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import sys
from typing import Any

from absl import flags
from ml_collections import config_flags

from codi_jax import config_rules, runtime, sharding
from codi_jax.config_rules import INT32_MAX, Bool, Custom, Enum, Int, Rule, Seq, Str
from codi_jax.errors import InputError
from codi_jax.options import rules as option_rules
from soft_jax.math_answers import JUDGES
from soft_jax.problems import LAYOUTS
from soft_jax.sampling import SamplerParams

flags.disclaim_key_flags()  # flags defined below belong to the program that calls define()

# Sampler flags: None = the preset's value, else the SamplerParams default.
_SAMPLER = (
  ("float", "temperature", "Thinking temperature (0 = argmax)."),
  ("integer", "top_k", "Thinking top-k (0 = off)."),
  ("float", "top_p", "Thinking top-p, in (0, 1]."),
  ("float", "min_p", "Thinking min-p, in [0, 1)."),
  ("integer", "max_topk", "K: tokens mixed into a concept token."),
  ("float", "dirichlet_alpha", "Dirichlet gamma (> 0)."),
  ("float", "gumbel_tau", "Gumbel-Softmax temperature (> 0)."),
  ("string", "after_temperature", "Answer-phase temperature, or `thinking` to reuse it."),
  ("integer", "after_top_k", "Answer-phase top-k (0 = off)."),
  ("float", "after_top_p", "Answer-phase top-p."),
  ("float", "after_min_p", "Answer-phase min-p."),
  ("float", "cold_stop_entropy", "Cold Stop theta (0 = off)."),
  ("integer", "cold_stop_patience", "Cold Stop patience P."),
  ("bool", "entropy_normalized", "Entropy / ln V (Stochastic Soft Thinking's rule)."),
  ("integer", "max_thinking_tokens", "Thinking budget incl. the forced `</think>` (0 = off)."),
  ("string", "answer_phase", "sample | legacy_argmax (the published numbers' answer phase)."),
  ("bool", "answer_low_entropy_abort", "Abort rows on P low-entropy answer steps."),
  ("string", "embed_mix_dtype", "float32 | model (the reference's model-dtype sum)."),
)
SAMPLER_FLAGS = tuple(name for _, name, _ in _SAMPLER)


_INT32 = {"hi": INT32_MAX}


def _mesh_text_ok(v) -> bool:
  if not isinstance(v, str):
    return False
  if not v:
    return True
  sizes = [int(x) for x in v.split(",")]
  return len(sizes) == 3 and all(sharding.mesh_size_ok(s) for s in sizes) and sizes.count(-1) <= 1


# Every rule of a sampler knob (declared on its SamplerParams field).
SAMPLER: dict[str, Rule] = option_rules(SamplerParams)

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
  "logical_axis_rules": sharding.AXIS_RULES,
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
  "layout": Enum(tuple(sorted(LAYOUTS)), doc="problem fields"),
  "question_field": Str(nonempty=True, optional=True),
  "answer_field": Str(nonempty=True, optional=True),
  "id_field": Str(nonempty=True, optional=True),
  "limit": Int(1, optional=True, doc="first N problems"),
  "n_samples": Int(1, **_INT32, doc="samples per problem"),
  "k": Seq(Custom(lambda v: int(str(v).strip()) >= 1, "an integer >= 1"), nonempty=True),
  "batch_size": Int(1, **_INT32, doc="rows per decoder call"),
  "judge": Enum(JUDGES, doc="answer checker"),
  "out": Str(nonempty=True, doc="output directory"),
  "overwrite": Bool(doc="replace results already in --out"),
  "progress": Bool(doc="progress bar"),
}


@functools.cache
def soft_flag_rules() -> dict[str, Rule]:
  """Every soft-CLI flag's rule: the preset's top-level fields, the sampler knobs, the rest."""
  top = {k: v for k, v in SOFT.items() if "." not in k}
  return {**top, **SAMPLER, **SOFT_FLAGS, "after_temperature": SAMPLER["after_temperature"]}


_CONFIG = None  # the --config holder, once `define("decode")` ran


def _define_decode():
  flags.DEFINE_string("model", "smollm2", "Alias, HF directory, .gguf file or hub id.")
  flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate at most (stop id included).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and parameter dtype.")
  flags.DEFINE_integer("length_bucket", 32, "Prompt lengths are padded up to a multiple of this.")
  global _CONFIG  # pylint: disable=global-statement
  if os.getcwd() not in sys.path:  # presets import `configs.soft` from the repository root
    sys.path.insert(0, os.getcwd())
  _CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Preset configs/soft/*.py[:variant[,benchmark]]; --config.<field>=<value> overrides one of "
    "its fields (--config.sampler.temperature=0.7); a short flag (--temperature) wins over both.",
  )
  flags.DEFINE_string("mode", None, "greedy | sample | soft | dirichlet | gumbel.")
  flags.DEFINE_integer("seed", None, "Sampling seed (default 0); same seed, same output.")
  flags.DEFINE_string(
    "think_end", None, "`</think>` text: auto (a single `</think>` token if any) | none | a token."
  )
  flags.DEFINE_bool(
    "think_end_last_id", None, "Use the last id of a multi-token --think_end (official rule)."
  )
  flags.DEFINE_string(
    "mesh",
    None,
    "Device mesh data,fsdp,tensor (one may be -1), e.g. 1,1,-1 for tensor parallelism over "
    "every device; empty: one device.",
  )


def _define_extrapolation():
  flags.DEFINE_bool(
    "allow_extrapolation",
    False,
    "Decode past the model's context (RoPE models only; quality degrades there). Without it, a "
    "prompt plus --max_new_tokens beyond the model's positions is refused before decoding.",
  )


def _define_sampler():
  for kind, name, help_text in _SAMPLER:
    getattr(flags, f"DEFINE_{kind}")(name, None, help_text)


def _define_prompt():
  flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).")


def _define_data():
  flags.DEFINE_string("data", None, "Problems: a .jsonl/.json file or a hub dataset id.")
  flags.DEFINE_string("layout", "auto", "gsm8k | math500 | aime | softthinking | auto.")
  flags.DEFINE_string("question_field", None, "Overrides the layout's question field.")
  flags.DEFINE_string("answer_field", None, "Overrides the layout's answer field.")
  flags.DEFINE_string("id_field", None, "Overrides the layout's id field.")
  flags.DEFINE_integer("limit", None, "Use only the first N problems.")


def _define_samples():
  flags.DEFINE_integer("n_samples", 1, "Samples per problem / prompt.")


def _define_output():
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace results already in --out (results of other settings are refused without it; "
    "complete ones of the same settings are kept) and discard partial ones instead of resuming.",
  )
  flags.DEFINE_bool("progress", True, "Show a tqdm progress bar on stderr.")


_GROUPS = {
  "decode": _define_decode,
  "extrapolation": _define_extrapolation,
  "sampler": _define_sampler,
  "prompt": _define_prompt,
  "data": _define_data,
  "samples": _define_samples,
  "output": _define_output,
}


def define(*groups: str) -> None:
  """Defines the named flag groups (decode, extrapolation, sampler, prompt, data, samples, output)
  for the calling program; call once, when the CLI module runs as `__main__`."""
  for g in groups:
    _GROUPS[g]()


def value(name: str) -> Any:
  """The parsed value of a flag defined by `define`."""
  return flags.FLAGS[name].value


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
  """Prompt ids as fed to the model, after the chat template if asked."""
  if chat:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
  return tokenizer.encode(text, add_special_tokens=True)


def load_config(spec: str | None):
  """A preset `path[:arg]` -> its get_config(arg) ConfigDict (None for no spec)."""
  if not spec:
    return None
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise InputError(f"--config: {path}: no such file")
  if os.getcwd() not in sys.path:  # presets import `configs.soft` from the repository root
    sys.path.insert(0, os.getcwd())
  module_spec = importlib.util.spec_from_file_location("_soft_preset", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
  except Exception as e:  # noqa: BLE001  (any error inside the preset is reported in one line)
    raise InputError(f"--config: {spec}: {type(e).__name__}: {e}") from None


def _after_temperature(value):
  """--after_temperature: a number, or `thinking` (None: reuse the thinking temperature)."""
  if value is None or value == "thinking" or isinstance(value, int | float):
    return None if value == "thinking" else value
  try:
    return float(value)
  except ValueError:
    raise InputError(
      f"--after_temperature: expected a number or 'thinking', got {value!r}"
    ) from None


def sampler_params(mode: str, config=None, overrides: dict | None = None):
  """SamplerParams from the defaults, then config.sampler, then explicit flag values; validated."""
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


def setting(name: str, config, default=None, values=None, present=None):
  """A flag given on the command line wins over the preset, which wins over the flag default.

  values / present: the flag values and the names given (default: read from absl's FLAGS).
  """
  if values is None:
    flag = flags.FLAGS[name] if name in flags.FLAGS else None
    values = {} if flag is None else {name: flag.value}
    present = {name} if flag is not None and flag.present else set()
  if name in (present or ()):
    return values[name]
  if config is not None and name in config:
    return config[name]
  return values.get(name, default)


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
  config: Any  # the preset ConfigDict or None
  mesh: Any = None  # jax Mesh or None (one device)
  rules: Any = None  # the preset's logical-axis rules, or None for the library default
  allow_extrapolation: bool = False  # decode past a RoPE model's positions


def make_mesh(text: str | None):
  """--mesh "data,fsdp,tensor" -> an Auto mesh over every device, or None for ""."""
  if not text:
    return None
  try:
    sizes = [int(x) for x in text.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != 3:
    raise InputError(
      f"--mesh: expected three integers data,fsdp,tensor (one may be -1), got {text!r}"
    )
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, sizes)), where="--mesh")


def check_flags(values: dict[str, Any]) -> None:
  """Every flag value against its rule (`soft_flag_rules`); None = not given."""
  rules = soft_flag_rules()
  for name, v in values.items():
    if name == "after_temperature":
      v = _after_temperature(v)
    if v is None:
      continue
    rule = rules[name]
    if not rule.ok(v):
      config_rules.fail(name, v, rule.allowed(), prefix="--")


def check_preset(cfg, spec: str) -> None:
  """A preset's fields against `SOFT`: unknown fields, types and ranges."""
  if cfg is not None:
    config_rules.check_tree(cfg, SOFT, prefix=f"--config={spec}: ", complete=False)


def flag_values() -> tuple[dict[str, Any], set[str]]:
  """(name -> value, names given on the command line) of this program's soft-CLI flags; `config`
  is the preset's spec text (its loaded, overridden ConfigDict: `preset_value`)."""
  names = [n for n in soft_flag_rules() if n in flags.FLAGS and n != "config"]
  values = {n: flags.FLAGS[n].value for n in names}
  present = {n for n in names if flags.FLAGS[n].present}
  if _CONFIG is not None and "config" in flags.FLAGS:
    given = flags.FLAGS["config"].present  # else config_flags has no file name to give
    values["config"] = config_flags.get_config_filename(flags.FLAGS["config"]) if given else None
  return values, present


def preset_value(prog: str):
  """The --config preset as loaded with its --config.<field> overrides (None: no --config); a
  file that does not load is one line and exit 2."""
  if _CONFIG is None or not flags.FLAGS["config"].present:
    return None
  return runtime.config_value(_CONFIG, prog)


def resolve(
  values: dict[str, Any], present=(), default_mode: str = "greedy", preset=None
) -> Settings:
  """The validation pass of a soft CLI, before any model is loaded: every flag (`check_flags`),
  the --config preset's fields (`check_preset`), then the merged settings and sampler.

  preset: the preset as the command line loaded it (overrides applied); None: `load_config` of
  the `config` spec in `values`.
  """
  check_flags(values)
  spec = values.get("config")
  cfg = preset if preset is not None else load_config(spec)
  check_preset(cfg, spec)
  present = set(present)

  def get(name):
    return setting(name, cfg, values=values, present=present)

  mode = get("mode") or default_mode
  params = sampler_params(mode, cfg, {k: values.get(k) for k in SAMPLER_FLAGS})
  rules = cfg.get("logical_axis_rules") if cfg is not None else None
  merged = {k: get(k) for k in ("model", "max_new_tokens", "dtype", "length_bucket")}
  config_rules.check_values(merged, SOFT, prefix="--")  # flag, else preset
  return Settings(
    **merged,
    mode=mode,
    params=params,
    seed=int(get("seed") or 0),
    think_end=get("think_end") or "auto",
    think_end_last_id=bool(get("think_end_last_id")),
    config=cfg,
    mesh=make_mesh(get("mesh")),
    rules=rules,
    allow_extrapolation=bool(values.get("allow_extrapolation", False)),
  )


def settings(default_mode: str = "greedy", prog: str = "soft_jax") -> Settings:
  """Resolves this program's flags against --config (call inside `exit_on_input_error`)."""
  values, present = flag_values()
  return resolve(values, present, default_mode, preset=preset_value(prog))
