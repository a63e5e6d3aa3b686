"""The `Tokenizer`: a wrapper over HF `tokenizers` with the special ids, stop ids and chat template
(rendered as HF transformers renders it).

Built from a GGUF (`tokenizer_gguf.from_gguf`), an HF directory (`tokenizer_hf.from_hf_dir`),
GPT-2's files or text (`tokenizer_bpe`); each constructor reproduces what transformers builds from
the same source, so ids match it.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken

from codi_jax.errors import InputError


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
