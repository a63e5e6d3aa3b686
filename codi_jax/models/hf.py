"""HF transformers checkpoints <-> our parameters: config.json mapping (both ways), weight names,
assignment, and export (LoRA merged or left out).

The tensor files themselves are read and written by `weights_io` (safetensors without torch).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from codi_jax.errors import InputError
from codi_jax.models import layout, weights_io
from codi_jax.models.config import ARCHS, LoRAConfig, ModelConfig, RopeScaling
from codi_jax.models.transformer import Transformer

# ---------------------------------------------------------------------------------------------- config


def config_from_hf(
  hf: dict,
  *,
  where: str = "config.json",
  dtype: str = "float32",
  param_dtype: str = "float32",
  lora: LoRAConfig | None = None,
) -> ModelConfig:
  """Maps an HF config dict (gpt2, llama, qwen2, mistral-style llama) to a ModelConfig."""
  arch = hf.get("model_type")
  if arch == "mistral":
    arch = "llama"
  if arch not in ARCHS:
    raise InputError(
      f"{where}: unsupported architecture {arch!r} (field model_type); "
      f"supported: {', '.join(ARCHS)}"
    )

  def need(key):
    if key not in hf:
      raise InputError(f"{where}: missing field {key!r} for model_type {arch!r}")
    if not isinstance(hf[key], int) or isinstance(hf[key], bool):
      raise InputError(f"{where}: field {key!r} must be an integer, got {hf[key]!r}")
    return hf[key]

  common = dict(
    arch=arch, vocab_size=need("vocab_size"), dtype=dtype, param_dtype=param_dtype, lora=lora
  )
  if arch == "gpt2":
    D = need("n_embd")
    return ModelConfig(
      **common,
      num_layers=need("n_layer"),
      d_model=D,
      num_heads=need("n_head"),
      num_kv_heads=need("n_head"),
      head_dim=D // need("n_head"),
      d_ff=hf.get("n_inner") or 4 * D,
      max_positions=need("n_positions"),
      norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      tie_embeddings=hf.get("tie_word_embeddings", True),
      embed_dropout=hf.get("embd_pdrop", 0.1),
      attn_dropout=hf.get("attn_pdrop", 0.1),
      resid_dropout=hf.get("resid_pdrop", 0.1),
    )
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise InputError(f"{where}: unsupported hidden_act {act!r}; only 'silu' (SwiGLU)")
  if hf.get("mlp_bias") or (arch == "llama" and hf.get("attention_bias")):
    raise InputError(f"{where}: mlp_bias/attention_bias are not supported for {arch}")
  D, H = need("hidden_size"), need("num_attention_heads")
  rs = hf.get("rope_scaling") or hf.get("rope_parameters")
  scaling = None
  rope_theta = hf.get("rope_theta")
  if rs:
    rope_theta = rope_theta or rs.get("rope_theta")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "llama3":
      scaling = RopeScaling(
        "llama3",
        float(rs["factor"]),
        float(rs["low_freq_factor"]),
        float(rs["high_freq_factor"]),
        int(rs["original_max_position_embeddings"]),
      )
    elif kind == "linear":
      scaling = RopeScaling("linear", float(rs["factor"]))
    elif kind != "default":
      raise InputError(
        f"{where}: unsupported rope scaling type {kind!r}; supported: llama3, linear"
      )
  if hf.get("use_sliding_window") and arch == "qwen2":
    raise InputError(f"{where}: use_sliding_window=true is not supported")
  return ModelConfig(
    **common,
    num_layers=need("num_hidden_layers"),
    d_model=D,
    num_heads=H,
    num_kv_heads=hf.get("num_key_value_heads") or H,
    head_dim=hf.get("head_dim") or D // H,
    d_ff=need("intermediate_size"),
    max_positions=hf.get("max_position_embeddings", 2048),
    norm_eps=hf.get("rms_norm_eps", 1e-6),
    rope_theta=float(rope_theta or 10000.0),
    rope_scaling=scaling,
    tie_embeddings=hf.get("tie_word_embeddings", False),
    qkv_bias=arch == "qwen2",
  )


# ----------------------------------------------------------------------------------------- names


def hf_name(path: tuple, arch: str) -> tuple[str, bool]:
  """Our parameter path -> (HF state-dict key without the model prefix, transpose?)."""
  p = ".".join(str(x) for x in path)
  if p == "embed.embedding":
    return ("wte.weight" if arch == "gpt2" else "embed_tokens.weight"), False
  if p == "pos_embed.embedding":
    return "wpe.weight", False
  if p == "lm_head.kernel":
    return "lm_head.weight", True
  if p.startswith("final_norm."):
    return ("ln_f." if arch == "gpt2" else "norm.") + _norm_leaf(p), False
  m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(\w+)", p)
  if not m:
    raise KeyError(p)
  i, mod, leaf = m.groups()
  if arch == "gpt2":
    mod = {
      "attn_c_proj": "attn.c_proj",
      "mlp_c_proj": "mlp.c_proj",
      "c_attn": "attn.c_attn",
      "c_fc": "mlp.c_fc",
    }.get(mod, mod)
    prefix = f"h.{i}."
    if leaf in ("kernel", "bias") and mod.startswith(("attn", "mlp")):
      return prefix + mod + (
        ".weight" if leaf == "kernel" else ".bias"
      ), False  # Conv1D is [in, out]
  else:
    mod = {
      "q_proj": "self_attn.q_proj",
      "k_proj": "self_attn.k_proj",
      "v_proj": "self_attn.v_proj",
      "o_proj": "self_attn.o_proj",
      "gate_proj": "mlp.gate_proj",
      "up_proj": "mlp.up_proj",
      "down_proj": "mlp.down_proj",
    }.get(mod, mod)
    prefix = f"layers.{i}."
    if leaf == "kernel":
      return prefix + mod + ".weight", True
    if leaf == "bias" and "proj" in mod:
      return prefix + mod + ".bias", False
  return prefix + mod + "." + _norm_leaf(p), False


def _norm_leaf(p: str) -> str:
  return "weight" if p.endswith("scale") else "bias"


_MODEL_PREFIXES = ("transformer.", "model.")
_IGNORED = re.compile(r"(^|\.)attn\.(masked_)?bias$|rotary_emb\.inv_freq$")


def strip_prefix(key: str) -> str:
  for pre in _MODEL_PREFIXES:
    if key.startswith(pre):
      return key[len(pre) :]
  return key


# ------------------------------------------------------------------------------------------ loading


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The model's structure with ShapeDtypeStructs, nothing allocated."""
  return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(params=0)))


def assign(
  cfg: ModelConfig,
  tensors: dict[str, np.ndarray],
  *,
  where: str,
  seed: int = 0,
  name_fn=None,
  checked: bool = False,
) -> Transformer:
  """Builds a model whose base parameters come from `tensors` (HF names), LoRA freshly initialised.

  Strict accounting: a missing tensor or a shape mismatch raises InputError naming the key;
  unexpected keys raise too (HF buffers such as GPT-2's attn.bias are ignored). Each tensor is
  checked for NaN/Inf as it is taken (`weights_io.check_tensor`, naming its file: a memory-mapped
  safetensors shard, else `where`) unless its reader already did (`checked`: GGUF).
  """
  name_fn = name_fn or (lambda path: hf_name(path, cfg.arch))
  keys = {strip_prefix(k): k for k in tensors if not _IGNORED.search(k)}  # ours -> the file's
  tensors = {k: tensors[full] for k, full in keys.items()}
  # Values are found layer by layer (checkpoints name each layer), in the unrolled layout's order
  # so LoRA's fresh init is the same in both layouts, then stacked where the model scans.
  values, used = {}, set()
  key = jax.random.key(seed)
  unrolled = nnx.to_flat_state(nnx.state(abstract_model(cfg.replace(scan_layers=False))))
  for path, var in unrolled:
    shape, dtype = var.get_value().shape, var.get_value().dtype
    if path[-1] in ("lora_a", "lora_b"):
      if path[-1] == "lora_a":
        bound = 1.0 / np.sqrt(shape[0])
        k = jax.random.fold_in(key, len(values))
        val = np.asarray(jax.random.uniform(k, shape, dtype, -bound, bound))
      else:
        val = np.zeros(shape, dtype)
      values[tuple(path)] = val
      continue
    name, transpose = name_fn(path)
    if name not in tensors:
      raise InputError(f"{where}: missing tensor {name!r}")
    if not checked:
      raw = tensors[name]
      weights_io.check_tensor(raw, getattr(raw, "filename", None) or where, keys[name])
    arr = np.asarray(tensors[name])
    arr = arr.T if transpose else arr
    if arr.shape != shape:
      raise InputError(
        f"{where}: tensor {name!r} has shape {arr.shape[::-1] if transpose else arr.shape}, "
        f"config implies {shape[::-1] if transpose else shape}"
      )
    used.add(name)
    values[tuple(path)] = arr.astype(dtype, copy=False)
  extra = sorted(set(tensors) - used - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
  if extra:
    raise InputError(f"{where}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
  graphdef, state = nnx.split(abstract_model(cfg))
  flat = nnx.to_flat_state(state)
  leaves = [
    var.replace(value=jnp.asarray(layout.stacked_value(path, cfg.num_layers, values.pop)))
    for path, var in flat
  ]
  new_flat = nnx.FlatState(zip([p for p, _ in flat], leaves), sort=False)
  return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def model_prefix(arch: str) -> str:
  """The prefix of the backbone's keys in a transformers checkpoint (the LM head has none)."""
  return "transformer." if arch == "gpt2" else "model."


def full_name(name: str, arch: str) -> str:
  """An `hf_name` key as transformers' `*ForCausalLM` state dict spells it."""
  return name if name == "lm_head.weight" else model_prefix(arch) + name


def export_tensors(model: Transformer, *, merge_lora: bool = False) -> dict[str, np.ndarray]:
  """Our base parameters under HF names (model prefix omitted), e.g. to write a checkpoint.

  The embedding is the effective table (trained pad/bot/eot rows written in). With `merge_lora`,
  each adapted kernel becomes W + (alpha / r) * A @ B (computed in f32, stored in W's dtype), so
  the tensors describe the adapted model without peft; otherwise the adapters are left out.
  Either parameter layout gives the same tensors (stacked blocks are split per layer).
  """
  flat = dict(layout.per_layer(nnx.to_flat_state(nnx.state(model, nnx.Param))))
  lora = dict(layout.per_layer(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))))
  out = {}
  for path, value in flat.items():
    if path[-1] in ("lora_a", "lora_b") or path == ("embed", "special"):  # LoRAParam is a Param
      continue
    name, transpose = hf_name(path, model.cfg.arch)
    a = np.asarray(model.embed.table() if path == ("embed", "embedding") else value)
    if merge_lora and path[-1] == "kernel" and path[:-1] + ("lora_a",) in lora:
      a_f32 = np.asarray(lora[path[:-1] + ("lora_a",)], np.float32)
      b_f32 = np.asarray(lora[path[:-1] + ("lora_b",)], np.float32)
      delta = (a_f32 @ b_f32) * np.float32(model.cfg.lora.scale)
      a = (a.astype(np.float32) + delta).astype(a.dtype)
    out[name] = a.T if transpose else a
  return out


# ------------------------------------------------------------------------------------------ writing


def config_to_hf(cfg: ModelConfig, **token_ids: int | list[int] | None) -> dict:
  """A transformers `config.json` dict for `cfg` (GPT-2, Llama or Qwen2): the inverse of
  `config_from_hf`, in the transformers 4.x spelling (rope_theta / rope_scaling / torch_dtype),
  which 5.x reads too. `token_ids` (bos_token_id, eos_token_id, pad_token_id) are written as given
  (None too: transformers' defaults, e.g. GPT-2's 50256, would not fit the vocabulary).
  """
  common = {
    "vocab_size": cfg.vocab_size,
    "tie_word_embeddings": cfg.tie_embeddings,
    "torch_dtype": cfg.param_dtype,
    "use_cache": True,
    **token_ids,
  }
  if cfg.arch == "gpt2":
    return {
      "architectures": ["GPT2LMHeadModel"],
      "model_type": "gpt2",
      "n_embd": cfg.d_model,
      "n_layer": cfg.num_layers,
      "n_head": cfg.num_heads,
      "n_inner": cfg.d_ff,
      "n_positions": cfg.max_positions,
      "activation_function": "gelu_new",
      "layer_norm_epsilon": cfg.norm_eps,
      "embd_pdrop": cfg.embed_dropout,
      "attn_pdrop": cfg.attn_dropout,
      "resid_pdrop": cfg.resid_dropout,
      **common,
    }
  scaling = None
  if cfg.rope_scaling is not None:
    rs = cfg.rope_scaling
    scaling = {"rope_type": rs.rope_type, "factor": rs.factor}
    if rs.rope_type == "llama3":
      scaling.update(
        low_freq_factor=rs.low_freq_factor,
        high_freq_factor=rs.high_freq_factor,
        original_max_position_embeddings=rs.original_max_position_embeddings,
      )
  out = {
    "architectures": ["Qwen2ForCausalLM" if cfg.arch == "qwen2" else "LlamaForCausalLM"],
    "model_type": cfg.arch,
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.d_ff,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": cfg.max_positions,
    "rms_norm_eps": cfg.norm_eps,
    "rope_theta": cfg.rope_theta,
    "rope_scaling": scaling,
    **common,
  }
  if cfg.arch == "qwen2":
    out.update(use_sliding_window=False, sliding_window=None)
  else:
    out.update(attention_bias=False, mlp_bias=False)
  return out
