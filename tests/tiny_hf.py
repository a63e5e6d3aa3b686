"""A tiny HF model directory written with our own exporter (no torch): config.json, safetensors,
and a word-level tokenizer ("<eos>" = 0, "<unk>" = 1, "w2" ... "w99") with a chat template."""

from __future__ import annotations

import json
import os

import tokenizers

from codi_jax.models import config, hf, transformer, weights_io

V = 100
# The width of `config.tiny` (Llama, Qwen2) in transformers' config keys, for tiny random HF models.
HF_SIZES = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
TEMPLATE = (
  "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
  "{% if add_generation_prompt %}w5{% endif %}"
)


def write(path: str, arch: str = "llama", max_positions: int = 64, **sizes) -> str:
  """Writes the model (`config.tiny(arch)` with `sizes`) under `path` (created); returns it."""
  os.makedirs(path, exist_ok=True)
  cfg = config.tiny(arch, vocab_size=V, max_positions=max_positions, **sizes)
  model = transformer.build(cfg, seed=0)
  written = hf.config_to_hf(cfg, bos_token_id=0, eos_token_id=0, pad_token_id=0)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(written, f)
  tensors = {hf.full_name(k, arch): v for k, v in hf.export_tensors(model).items()}
  weights_io.write_safetensors(os.path.join(path, "model.safetensors"), tensors)
  return write_tokenizer(path)


def write_tokenizer(path: str) -> str:
  """The word-level tokenizer files (with the chat template) under `path`; returns it."""
  vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, V)}}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  backend.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(
      {"eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<eos>", "chat_template": TEMPLATE},
      f,
    )
  return path
