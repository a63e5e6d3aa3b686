"""GGUF files (llama.cpp): config from metadata, tensors dequantized with the `gguf` package.

Tensors are renamed to HF keys so that one strict assignment path (`hf.assign`) serves both formats.
"""

from __future__ import annotations

import os
import re

import numpy as np

from codi_jax.errors import InputError
from codi_jax.models.config import LoRAConfig, ModelConfig, RopeScaling


def open_reader(path: str):
  """A GGUFReader, with a one-line InputError for a missing, truncated or corrupt file."""
  import gguf  # pylint: disable=import-outside-toplevel

  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(
      f"{path}: not a valid GGUF file (truncated or corrupt: {type(e).__name__}: {e})"
    ) from None
  size = os.path.getsize(path)
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size:
      raise InputError(f"{path}: truncated (tensor {t.name!r} ends past the end of the file)")
  return reader


def field(reader, key: str, default=None):
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def config_from_gguf(
  reader, path: str, *, dtype="float32", param_dtype="float32", lora: LoRAConfig | None = None
) -> ModelConfig:
  arch = field(reader, "general.architecture")
  if arch not in ("llama", "qwen2", "gpt2"):
    raise InputError(
      f"{path}: unsupported architecture {arch!r} (general.architecture); "
      "supported: gpt2, llama, qwen2"
    )

  def need(key):
    v = field(reader, f"{arch}.{key}")
    if v is None:
      raise InputError(f"{path}: missing metadata {arch}.{key}")
    return v

  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise InputError(
      f"{path}: GGUF rope_freqs (Llama-3.1+ RoPE scaling baked into a tensor) is not "
      "supported; load the HF checkpoint instead"
    )
  D, H = need("embedding_length"), need("attention.head_count")
  vocab = field(reader, f"{arch}.vocab_size") or len(field(reader, "tokenizer.ggml.tokens", []))
  common = dict(
    arch=arch,
    vocab_size=vocab,
    num_layers=need("block_count"),
    d_model=D,
    num_heads=H,
    num_kv_heads=field(reader, f"{arch}.attention.head_count_kv") or H,
    d_ff=need("feed_forward_length"),
    max_positions=need("context_length"),
    tie_embeddings="output.weight" not in names,
    dtype=dtype,
    param_dtype=param_dtype,
    lora=lora,
  )
  if arch == "gpt2":
    return ModelConfig(**common, head_dim=D // H, norm_eps=need("attention.layer_norm_epsilon"))
  scaling = None
  if field(reader, f"{arch}.rope.scaling.type") == "linear":
    scaling = RopeScaling("linear", float(field(reader, f"{arch}.rope.scaling.factor")))
  return ModelConfig(
    **common,
    head_dim=field(reader, f"{arch}.rope.dimension_count") or D // H,
    norm_eps=float(need("attention.layer_norm_rms_epsilon")),
    rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
    rope_scaling=scaling,
    qkv_bias=arch == "qwen2",
  )


_LLAMA = {
  "attn_norm": "input_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_norm": "post_attention_layernorm",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
_GPT2 = {
  "attn_norm": "ln_1",
  "attn_qkv": "attn.c_attn",
  "attn_output": "attn.c_proj",
  "ffn_norm": "ln_2",
  "ffn_up": "mlp.c_fc",
  "ffn_down": "mlp.c_proj",
}


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (interleaved RoPE) to HF's rotate-half layout."""
  out, din = w.shape[0], w.shape[1:]
  return w.reshape(n_heads, out // n_heads // 2, 2, *din).swapaxes(1, 2).reshape(w.shape)


def tensors_from_gguf(reader, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Dequantized tensors under HF names; GPT-2 linears transposed to Conv1D [in, out]."""
  from gguf.quants import dequantize  # pylint: disable=import-outside-toplevel

  gpt2 = cfg.arch == "gpt2"
  top = (
    {"token_embd": "wte", "position_embd": "wpe", "output_norm": "ln_f", "output": "lm_head"}
    if gpt2
    else {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
  )
  out = {}
  for t in reader.tensors:
    a = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
    if m:
      i, kind, leaf = m.groups()
      name = (f"h.{i}." + _GPT2[kind]) if gpt2 else (f"layers.{i}." + _LLAMA[kind])
      if cfg.arch == "llama" and kind in ("attn_q", "attn_k"):
        a = _unpermute(a, cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads)
      if gpt2 and leaf == "weight" and a.ndim == 2:
        a = a.T
      out[f"{name}.{leaf}"] = a
    else:
      base, leaf = t.name.rsplit(".", 1)
      if base not in top:
        raise InputError(f"unexpected GGUF tensor {t.name!r}")
      out[f"{top[base]}.{leaf}"] = a
  return out
