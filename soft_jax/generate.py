r"""Decode from any supported model (for now greedy, the token baseline of the soft samplers).

  python -m soft_jax.generate --model=smollm2 --prompt="What is 12 + 7?" --max_new_tokens=32 --chat
  python -m soft_jax.generate --model=/path/to/hf_dir --prompt="..." --json

--model takes an alias (smollm2), a local HF directory, a .gguf file or a hub id. With --json the
last line of stdout is one JSON object (`results` holds one such object per prompt when several
--prompt flags are given).
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from codi_jax import runtime
from codi_jax.errors import InputError, exit_on_input_error

_MODEL = flags.DEFINE_string("model", "smollm2", "Alias, HF directory, .gguf file or hub id.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate at most (stop id included).")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt as a user turn with the model's chat template.")
_JSON = flags.DEFINE_bool("json", False, "End stdout with one JSON line.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and parameter dtype.")
_BUCKET = flags.DEFINE_integer("length_bucket", 32, "Prompt lengths are padded up to a multiple of this.")


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
  """Prompt ids as fed to the model, after the chat template if asked."""
  if chat:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
  return tokenizer.encode(text, add_special_tokens=True)


def run(model_spec: str, prompts: list[str], max_new: int, *, chat: bool, dtype: str, bucket: int) -> list[dict]:
  """Loads the model, generates for every prompt in one batch, returns one record per prompt."""
  # Imported here so that flag errors answer without loading JAX.
  from codi_jax.decoding import Generator  # pylint: disable=import-outside-toplevel
  from codi_jax.models import loader  # pylint: disable=import-outside-toplevel

  if not prompts:
    raise InputError("--prompt: no prompt given")
  for i, p in enumerate(prompts):
    if not p.strip():
      raise InputError(f"--prompt: prompt {i + 1} is empty")
  if max_new < 1:
    raise InputError(f"--max_new_tokens: must be >= 1, got {max_new}")
  if bucket < 1:
    raise InputError(f"--length_bucket: must be >= 1, got {bucket}")
  loaded = loader.load(model_spec, dtype=dtype, param_dtype=dtype)
  tok = loaded.tokenizer
  ids = [encode_prompt(tok, p, chat) for p in prompts]
  pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
  gen = Generator(loaded.model, pad_id=pad, eos_ids=tok.eos_ids)
  t0 = time.perf_counter()
  outs = gen(ids, max_new, length_bucket=bucket)
  seconds = time.perf_counter() - t0
  eos = set(tok.eos_ids)
  return [{
      "model": model_spec, "mode": "greedy", "prompt": p, "prompt_tokens": i, "tokens": o,
      "text": tok.decode(o, skip_special_tokens=True),
      "stop_reason": "eos" if o and o[-1] in eos else "length", "seconds": round(seconds, 3),
  } for p, i, o in zip(prompts, ids, outs)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime.setup_cli()
  with exit_on_input_error("soft_jax.generate"):
    records = run(_MODEL.value, _PROMPT.value or [], _MAX_NEW.value, chat=_CHAT.value, dtype=_DTYPE.value,
                  bucket=_BUCKET.value)
  for r in records:
    print(r["text"])
  if _JSON.value:
    print(json.dumps(records[0] if len(records) == 1 else {"results": records}))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
