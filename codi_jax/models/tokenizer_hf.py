"""The tokenizer of a local HF model directory (`from_hf_dir`): `tokenizer.json`, or GPT-2's
`vocab.json` + `merges.txt`, with the special tokens, stop ids and chat template its config files
name, resolved as transformers resolves them.
"""

from __future__ import annotations

import os
from typing import Any

import tokenizers
from tokenizers import AddedToken

from codi_jax.errors import InputError
from codi_jax.models.tokenizer import Tokenizer
from codi_jax.models.tokenizer_bpe import (
  GPT2_EOS,
  byte_level_from_files,
  read_json,
  template_processor,
)


def _token_content(value: Any) -> str | None:
  """A special token's text from a config value: a string or an AddedToken dict."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _template_from_config(value: Any) -> str | None:
  """The default chat template from tokenizer_config's `chat_template` (string or named list)."""
  if isinstance(value, list):
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    value = named.get("default")
  return value if isinstance(value, str) else None


def _ids_list(value: Any) -> list[int]:
  if isinstance(value, int):
    return [value]
  if isinstance(value, list):
    return [v for v in value if isinstance(v, int)]
  return []


def from_hf_dir(path: str | os.PathLike) -> Tokenizer:
  """The tokenizer of a local HF model dir (`tokenizer.json`, or `vocab.json` + `merges.txt`)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise InputError(f"{path}: no such directory")

  def file(name: str) -> str:
    return os.path.join(path, name)

  def optional_json(name: str) -> dict:
    if not os.path.isfile(file(name)):
      return {}
    data = read_json(file(name))
    if not isinstance(data, dict):
      raise InputError(f"{file(name)}: expected a JSON object")
    return data

  if os.path.isfile(file("tokenizer.json")):
    try:
      backend = tokenizers.Tokenizer.from_file(file("tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception on bad files.
      raise InputError(f"{file('tokenizer.json')}: not a valid tokenizers file ({e})") from None
    default_special = None
  elif os.path.isfile(file("vocab.json")) and os.path.isfile(file("merges.txt")):
    backend = byte_level_from_files(file("vocab.json"), file("merges.txt"))
    default_special = GPT2_EOS if backend.token_to_id(GPT2_EOS) is not None else None
  else:
    raise InputError(f"{path}: no tokenizer.json, nor vocab.json + merges.txt")

  config = optional_json("tokenizer_config.json")
  # As in transformers, special_tokens_map.json overrides tokenizer_config.json.
  special = {**config, **optional_json("special_tokens_map.json")}
  generation = optional_json("generation_config.json")

  added = {t.content for t in backend.get_added_tokens_decoder().values()}
  decoder = config.get("added_tokens_decoder")
  if isinstance(decoder, dict):
    new = []
    for entry in decoder.values():
      content = _token_content(entry)
      if content is None or content in added:
        continue
      flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
      new.append(AddedToken(content, **{k: bool(entry[k]) for k in flags if k in entry}))
      added.add(content)
    if new:
      backend.add_tokens(new)

  names = {}
  for name in ("bos", "eos", "unk", "pad"):
    content = _token_content(special.get(f"{name}_token"))
    if content is None and name in ("bos", "eos", "unk") and f"{name}_token" not in special:
      content = default_special
    names[name] = content
  missing = [t for t in names.values() if t is not None and t not in added]
  if missing:
    # Named special tokens become special added tokens, appended if not in the vocabulary.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
  ids = {k: (backend.token_to_id(t) if t is not None else None) for k, t in names.items()}

  eos_ids = _ids_list(generation.get("eos_token_id"))
  if ids["eos"] is None and eos_ids:
    ids["eos"] = eos_ids[0]
  if ids["bos"] is None and isinstance(generation.get("bos_token_id"), int):
    ids["bos"] = generation["bos_token_id"]
  if ids["pad"] is None and isinstance(generation.get("pad_token_id"), int):
    ids["pad"] = generation["pad_token_id"]

  if "add_bos_token" in config or "add_eos_token" in config:
    # An explicit flag rebuilds the post-processor, as transformers does.
    def named(key: str, flag: str) -> tuple[str, int] | None:
      token, token_id = names[key], ids[key]
      if not config.get(flag) or token is None or token_id is None:
        return None
      return token, token_id

    backend.post_processor = template_processor(
      named("bos", "add_bos_token"), named("eos", "add_eos_token")
    )

  chat_template = _template_from_config(config.get("chat_template"))
  if os.path.isfile(file("chat_template.jinja")):
    try:
      with open(file("chat_template.jinja"), encoding="utf-8") as f:
        chat_template = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise InputError(f"{file('chat_template.jinja')}: cannot read ({e})") from None
  elif chat_template is None and os.path.isfile(file("chat_template.json")):
    chat_template = _template_from_config(optional_json("chat_template.json").get("chat_template"))

  return Tokenizer(
    backend,
    bos_id=ids["bos"],
    eos_id=ids["eos"],
    pad_id=ids["pad"],
    unk_id=ids["unk"],
    extra_eos_ids=eos_ids,
    chat_template=chat_template,
    source=path,
  )
