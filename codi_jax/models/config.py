"""Backbone hyper-parameters: one frozen dataclass covering GPT-2, Llama (incl. SmolLM2) and Qwen2."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

ARCHS = ("gpt2", "llama", "qwen2")

# Attention kernel: "xla" is our einsum path (layers.attention); "dot_product" calls
# jax.nn.dot_product_attention (implementation=None: jax's choice, XLA on jax 0.10.2; same masks);
# "cudnn" asks it for cuDNN's fused kernel on a GPU where the shape fits, else runs as dot_product.
AttentionImpl = Literal["xla", "dot_product", "cudnn"]

# peft-style LoRA target names per architecture (a target matches a module whose path ends with it).
LORA_TARGETS = {
  "gpt2": ("c_attn", "c_proj", "c_fc"),
  "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
  "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling: HF `rope_scaling` with rope_type "llama3" or "linear"."""

  rope_type: Literal["llama3", "linear"] = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """LoRA on chosen linear layers: y += dropout(x) @ A @ B * alpha / rank (peft semantics)."""

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ()  # empty: every linear layer of the architecture (LORA_TARGETS)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and options of a decoder-only LM. Hashable, so it can be a static jit argument."""

  arch: Literal["gpt2", "llama", "qwen2"]
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  max_positions: int = 2048  # GPT-2: rows of the learned position table; RoPE: context length
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_embeddings: bool = True
  qkv_bias: bool = False  # Qwen2: True (GPT-2 always has biases)
  embed_dropout: float = 0.0  # GPT-2 embd_pdrop
  attn_dropout: float = 0.0  # GPT-2 attn_pdrop
  resid_dropout: float = 0.0  # GPT-2 resid_pdrop
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  attention_impl: AttentionImpl = "xla"
  lora: LoRAConfig | None = None
  # Blocks stacked on a leading layer axis and run by one lax.scan per pass: compile time stays
  # flat in depth (models/layout.py); False: a Python list, every layer unrolled in every pass.
  scan_layers: bool = True

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"unsupported architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.attention_impl not in typing.get_args(AttentionImpl):
      raise ValueError(
        f"unknown attention_impl {self.attention_impl!r}; "
        f"supported: {', '.join(typing.get_args(AttentionImpl))}"
      )

  @property
  def lora_targets(self) -> tuple[str, ...]:
    if self.lora is None:
      return ()
    return self.lora.targets or LORA_TARGETS[self.arch]

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)


def tiny(arch: str, **overrides) -> ModelConfig:
  """A few-kB config for tests and the CPU demo."""
  base = dict(
    arch=arch,
    vocab_size=128,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=4,
    head_dim=8,
    d_ff=64,
    max_positions=256,
  )
  if arch != "gpt2":
    base.update(num_kv_heads=2, qkv_bias=arch == "qwen2")
  base.update(overrides)
  return ModelConfig(**base)
