r"""Decode from any supported model: greedy, token sampling, Soft Thinking and its stochastic variants.

  python -m soft_jax.generate --model=smollm2 --prompt="What is 12 + 7?" --max_new_tokens=32 --chat
  python -m soft_jax.generate --model=smollm2 --mode=gumbel --gumbel_tau=0.5 --prompt="..." --json
  python -m soft_jax.generate --config=configs/soft/smollm2.py:dirichlet --prompt="..." --json
  python -m soft_jax.generate --model=/path/to/hf_dir --prompt="..." --json

--model takes an alias (smollm2), a local HF directory, a .gguf file or a hub id. --mode is one of
greedy (the default; the fast greedy Generator), sample, soft, dirichlet, gumbel. --config reads a
configs/soft/*.py file; flags given on the command line win over it, and sampler flags not given
anywhere take the Soft Thinking defaults (soft_jax.sampling.SamplerParams). With --json the last
line of stdout is one JSON object (`results` holds one such object per prompt when several --prompt
flags are given), with the mode, the thinking length and every sampling parameter.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from codi_jax import runtime
from codi_jax.errors import InputError, exit_on_input_error

_MODEL = flags.DEFINE_string("model", "smollm2", "Alias, HF directory, .gguf file or hub id.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate at most (stop id included).")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt as a user turn with the model's chat template.")
_JSON = flags.DEFINE_bool("json", False, "End stdout with one JSON line.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and parameter dtype.")
_BUCKET = flags.DEFINE_integer("length_bucket", 32, "Prompt lengths are padded up to a multiple of this.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional configs/soft/*.py[:variant] file.")
_MODE = flags.DEFINE_string("mode", None, "greedy | sample | soft | dirichlet | gumbel (default greedy).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default 0); same seed, same output.")
_THINK_END = flags.DEFINE_string(
    "think_end", None, "`</think>` text: auto (a single `</think>` token if any) | none | a token.")
_THINK_END_LAST_ID = flags.DEFINE_bool(
    "think_end_last_id", None, "Use the last id of a multi-token --think_end (official rule).")
# Sampler flags: None = the config's value, else the SamplerParams default (spec section 5).
_SAMPLER_FLAGS = {
    "temperature": flags.DEFINE_float("temperature", None, "Thinking temperature (0 = argmax)."),
    "top_k": flags.DEFINE_integer("top_k", None, "Thinking top-k (0 = off)."),
    "top_p": flags.DEFINE_float("top_p", None, "Thinking top-p, in (0, 1]."),
    "min_p": flags.DEFINE_float("min_p", None, "Thinking min-p, in [0, 1)."),
    "max_topk": flags.DEFINE_integer("max_topk", None, "K: tokens mixed into a concept token."),
    "dirichlet_alpha": flags.DEFINE_float("dirichlet_alpha", None, "Dirichlet gamma (> 0)."),
    "gumbel_tau": flags.DEFINE_float("gumbel_tau", None, "Gumbel-Softmax temperature (> 0)."),
    "after_temperature": flags.DEFINE_string(
        "after_temperature", None, "Answer-phase temperature, or `thinking` to reuse --temperature."),
    "after_top_k": flags.DEFINE_integer("after_top_k", None, "Answer-phase top-k (0 = off)."),
    "after_top_p": flags.DEFINE_float("after_top_p", None, "Answer-phase top-p."),
    "after_min_p": flags.DEFINE_float("after_min_p", None, "Answer-phase min-p."),
    "cold_stop_entropy": flags.DEFINE_float("cold_stop_entropy", None, "Cold Stop theta (0 = off)."),
    "cold_stop_patience": flags.DEFINE_integer("cold_stop_patience", None, "Cold Stop patience P."),
    "entropy_normalized": flags.DEFINE_bool("entropy_normalized", None, "Entropy / ln V ([SST])."),
    "max_thinking_tokens": flags.DEFINE_integer(
        "max_thinking_tokens", None, "Thinking budget incl. the forced `</think>` (0 = off)."),
    "answer_phase": flags.DEFINE_string("answer_phase", None, "sample | legacy_argmax."),
    "answer_low_entropy_abort": flags.DEFINE_bool(
        "answer_low_entropy_abort", None, "Abort rows on P low-entropy answer steps (HEAD only)."),
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
    raise InputError(f"--after_temperature: expected a number or 'thinking', got {value!r}") from None


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


def _thinking_length(tokens: list[int], think_end_id: int | None) -> int:
  """Greedy Generator path: tokens up to and including the first `</think>` (all if none)."""
  if think_end_id is not None and think_end_id in tokens:
    return tokens.index(think_end_id) + 1
  return len(tokens)


def run(model_spec: str, prompts: list[str], max_new: int, *, chat: bool, dtype: str, bucket: int,
        mode: str = "greedy", params=None, seed: int = 0, think_end: str = "auto",
        think_end_last_id: bool = False) -> list[dict]:
  """Loads the model, generates for every prompt in one batch, returns one record per prompt.

  mode=greedy without a thinking budget uses the greedy Generator; every other case SoftDecoder.
  """
  # Imported here so that flag errors answer without loading JAX.
  from codi_jax.decoding import Generator  # pylint: disable=import-outside-toplevel
  from codi_jax.models import loader  # pylint: disable=import-outside-toplevel
  from soft_jax import decode  # pylint: disable=import-outside-toplevel

  if not prompts:
    raise InputError("--prompt: no prompt given")
  for i, p in enumerate(prompts):
    if not p.strip():
      raise InputError(f"--prompt: prompt {i + 1} is empty")
  if max_new < 1:
    raise InputError(f"--max_new_tokens: must be >= 1, got {max_new}")
  if bucket < 1:
    raise InputError(f"--length_bucket: must be >= 1, got {bucket}")
  params = sampler_params(mode) if params is None else params.validate(prefix="--")
  loaded = loader.load(model_spec, dtype=dtype, param_dtype=dtype)
  params.validate(prefix="--", vocab=loaded.config.vocab_size)
  tok = loaded.tokenizer
  end_id = decode.resolve_think_end(tok, think_end, last_id=think_end_last_id)
  ids = [encode_prompt(tok, p, chat) for p in prompts]
  if chat and end_id is not None:
    ids = [decode.open_thinking(tok, i) for i in ids]
  pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
  t0 = time.perf_counter()
  if params.mode == "greedy" and not params.max_thinking_tokens:
    outs = Generator(loaded.model, pad_id=pad, eos_ids=tok.eos_ids)(ids, max_new, length_bucket=bucket)
    eos = set(tok.eos_ids)
    rows = [(o, _thinking_length(o, end_id), "eos" if o and o[-1] in eos else "length") for o in outs]
  else:
    dec = decode.SoftDecoder(loaded.model, params, pad_id=pad, eos_ids=tok.eos_ids,
                             think_end_id=end_id)
    outs = dec(ids, max_new_tokens=max_new, seed=seed, length_bucket=bucket)
    rows = [(r.tokens, r.thinking_tokens, r.stop_reason) for r in outs]
  seconds = time.perf_counter() - t0
  return [{
      "model": model_spec, "mode": params.mode, "prompt": p, "prompt_tokens": i, "tokens": o,
      "text": tok.decode(o, skip_special_tokens=True), "thinking_tokens": nt,
      "answer_text": tok.decode(o[nt:], skip_special_tokens=True), "stop_reason": stop,
      "seconds": round(seconds, 3), "seed": seed, "think_end_id": end_id, "dtype": dtype,
      "sampler": params.to_dict(),
  } for p, i, (o, nt, stop) in zip(prompts, ids, rows)]


def _setting(name: str, config, flag_value):
  """A flag given on the command line wins over the config, which wins over the flag default."""
  if config is not None and not flags.FLAGS[name].present and name in config:
    return config[name]
  return flag_value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime.setup_cli()
  with exit_on_input_error("soft_jax.generate"):
    cfg = _CONFIG.value
    mode = _MODE.value or (cfg.mode if cfg is not None and "mode" in cfg else "greedy")
    params = sampler_params(mode, cfg, {k: f.value for k, f in _SAMPLER_FLAGS.items()})
    think_end = _THINK_END.value
    if think_end is None:
      think_end = cfg.get("think_end", "auto") if cfg is not None else "auto"
    last_id = _THINK_END_LAST_ID.value
    if last_id is None:
      last_id = bool(cfg.get("think_end_last_id", False)) if cfg is not None else False
    seed = _SEED.value if _SEED.value is not None else (cfg.get("seed", 0) if cfg is not None else 0)
    records = run(_setting("model", cfg, _MODEL.value), _PROMPT.value or [],
                  _setting("max_new_tokens", cfg, _MAX_NEW.value),
                  chat=_setting("chat", cfg, _CHAT.value), dtype=_setting("dtype", cfg, _DTYPE.value),
                  bucket=_setting("length_bucket", cfg, _BUCKET.value), mode=mode, params=params,
                  seed=seed, think_end=think_end, think_end_last_id=last_id)
  for r in records:
    print(r["text"])
  if _JSON.value:
    print(json.dumps(records[0] if len(records) == 1 else {"results": records}))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
