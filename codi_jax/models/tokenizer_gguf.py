"""The tokenizer described by a GGUF file's metadata (`from_gguf`), built as transformers' GGUF
loader builds it: byte-level BPE with the pre-tokenizer split of `tokenizer.ggml.pre`.
"""

from __future__ import annotations

import os
from typing import Any

from tokenizers import AddedToken

from codi_jax.errors import InputError
from codi_jax.models.tokenizer import Tokenizer
from codi_jax.models.tokenizer_bpe import (
  GPT2_EOS,
  add_special_if_in_vocab,
  byte_level_backend,
  bytes_to_unicode,
  template_processor,
)

# Split regexes per GGUF `tokenizer.ggml.pre`, as transformers' GGUF loader maps them. A pre type
# not listed keeps GPT-2's own ByteLevel split.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
  r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
  r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
  r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# SmolLM2's "smollm" is not here: transformers keeps GPT-2's split, while llama.cpp (and SmolLM2's
# own tokenizer.json) also isolates every digit. No SmolLM2 token holds a digit next to anything,
# so numbers alone ("12345", "3.14159") encode the same; they differ when a whitespace run precedes
# a digit ("a  12", "x:\n\n42"): GPT-2's split leaves the last space or newline in front of the
# digit, the digit split merges the whole run. We follow transformers.
_GGUF_PRE_SPLITS = {
  **dict.fromkeys(
    (
      "llama3",
      "llama-v3",
      "llama-bpe",
      "falcon3",
      "falcon-h1",
      "pixtral",
      "midm-2.0",
      "lfm2",
      "jina-v5-nano",
      "dbrx",
      "smaug-bpe",
    ),
    _LLAMA3_SPLIT,
  ),
  "tekken": _TEKKEN_SPLIT,
  **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
  "qwen35": _QWEN35_SPLIT,
  **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4


def _read_gguf_tokenizer_fields(path: str, reader=None) -> dict[str, Any]:
  """The `tokenizer.*` metadata of a GGUF file (from `reader` if the caller already parsed it)."""
  import gguf  # Heavy; only GGUF loading needs it.

  if reader is None:
    if not os.path.isfile(path):
      raise InputError(f"{path}: no such file")
    try:
      reader = gguf.GGUFReader(path)
    except Exception as e:  # GGUFReader raises ValueError, KeyError, struct errors... on bad files.
      raise InputError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
  return {
    name: field.contents()
    for name, field in reader.fields.items()
    if name.startswith("tokenizer.") or name == "general.architecture"
  }


def from_gguf(path: str | os.PathLike, reader=None) -> Tokenizer:
  """The tokenizer described by a GGUF file's metadata, built as transformers builds it."""
  path = os.fspath(path)
  meta = _read_gguf_tokenizer_fields(path, reader)
  kind = meta.get("tokenizer.ggml.model")
  if kind is None:
    raise InputError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.model is missing)")
  if kind != "gpt2":
    raise InputError(
      f"{path}: unsupported tokenizer model {kind!r} (tokenizer.ggml.model); supported: 'gpt2'"
    )
  tokens = meta.get("tokenizer.ggml.tokens")
  merges = meta.get("tokenizer.ggml.merges")
  if not tokens or not merges:
    raise InputError(f"{path}: GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
  types = meta.get("tokenizer.ggml.token_type") or ()

  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())

  def in_alphabet(token: str) -> bool:
    return set(token) <= alphabet

  # A vocabulary entry that is not spelled in the byte alphabet is stored as raw text: respell it.
  vocab = {
    t if in_alphabet(t) else "".join(spelling[b] for b in t.encode("utf-8")): i
    for i, t in enumerate(tokens)
  }
  pairs = []
  for m in merges:
    pair = m.split(" ")
    if len(pair) != 2:
      raise InputError(f"{path}: bad merge {m!r} in tokenizer.ggml.merges")
    pairs.append(tuple(pair))
  backend = byte_level_backend(vocab, pairs, _GGUF_PRE_SPLITS.get(meta.get("tokenizer.ggml.pre")))

  def token_id(key: str) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}")
    return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

  ids = {k: token_id(f"{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
  # transformers' GPT2Tokenizer defaults unk/bos/eos to <|endoftext|>, making it special (it even
  # appends it when absent; we don't: the model has no row for it). Then the control tokens, less
  # those spelled outside the byte alphabet, which are llama.cpp mislabels.
  control = [t for t, k in zip(tokens, types) if k == _GGUF_CONTROL and in_alphabet(t)]
  add_special_if_in_vocab(backend, [GPT2_EOS, *control])
  vocab_now = backend.get_vocab(with_added_tokens=True)
  user = [
    AddedToken(t, special=False, normalized=False)
    for t, k in zip(tokens, types)
    if k == _GGUF_USER_DEFINED and t in vocab_now
  ]
  if user:
    backend.add_tokens(user)
  # Named special tokens end up special too, as with transformers' special tokens map.
  add_special_if_in_vocab(backend, [tokens[i] for i in ids.values() if i is not None])

  bos = (tokens[ids["bos"]], ids["bos"]) if ids["bos"] is not None else None
  eos = (tokens[ids["eos"]], ids["eos"]) if ids["eos"] is not None else None
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
  add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
  backend.post_processor = template_processor(bos if add_bos else None, eos if add_eos else None)

  extra = [i for i in (token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
  return Tokenizer(
    backend,
    bos_id=ids["bos"],
    eos_id=ids["eos"],
    pad_id=ids["padding"],
    unk_id=ids["unknown"],
    extra_eos_ids=extra,
    chat_template=meta.get("tokenizer.chat_template"),
    source=path,
  )
