"""The config.json fields of the hub models the presets name, for building their shapes offline.

`loader.load_config` reads a hub id's config.json from the local hub cache first, then from this
table, and only then from the network: compiling a run for a TPU topology (`codi_jax.compile`)
needs the sizes, never the weights. Only the fields `hf.config_from_hf` reads are kept, copied
from each repository's config.json; any other model: `--model_config=path/to/config.json`.
"""

from __future__ import annotations

_GPT2 = {  # openai-community/gpt2: GPT-2 small (124M)
  "model_type": "gpt2",
  "vocab_size": 50257,
  "n_embd": 768,
  "n_layer": 12,
  "n_head": 12,
  "n_positions": 1024,
  "layer_norm_epsilon": 1e-5,
  "embd_pdrop": 0.1,
  "attn_pdrop": 0.1,
  "resid_pdrop": 0.1,
  "tie_word_embeddings": True,
  "eos_token_id": 50256,
}
_LLAMA32_1B = {  # meta-llama/Llama-3.2-1B(-Instruct)
  "model_type": "llama",
  "vocab_size": 128256,
  "hidden_size": 2048,
  "intermediate_size": 8192,
  "num_hidden_layers": 16,
  "num_attention_heads": 32,
  "num_key_value_heads": 8,
  "head_dim": 64,
  "max_position_embeddings": 131072,
  "rms_norm_eps": 1e-5,
  "rope_theta": 500000.0,
  "rope_scaling": {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
  },
  "tie_word_embeddings": True,
  "hidden_act": "silu",
  "eos_token_id": 128009,
}
_LLAMA31_8B = {  # meta-llama/Llama-3.1-8B(-Instruct); DeepSeek-R1-Distill-Llama-8B has these sizes
  "model_type": "llama",
  "vocab_size": 128256,
  "hidden_size": 4096,
  "intermediate_size": 14336,
  "num_hidden_layers": 32,
  "num_attention_heads": 32,
  "num_key_value_heads": 8,
  "max_position_embeddings": 131072,
  "rms_norm_eps": 1e-5,
  "rope_theta": 500000.0,
  "rope_scaling": {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
  },
  "tie_word_embeddings": False,
  "hidden_act": "silu",
  "eos_token_id": 128009,
}
_QWEN2_32B = {  # Qwen/QwQ-32B (Qwen2.5-32B shapes)
  "model_type": "qwen2",
  "vocab_size": 152064,
  "hidden_size": 5120,
  "intermediate_size": 27648,
  "num_hidden_layers": 64,
  "num_attention_heads": 40,
  "num_key_value_heads": 8,
  "max_position_embeddings": 40960,
  "rms_norm_eps": 1e-5,
  "rope_theta": 1000000.0,
  "tie_word_embeddings": False,
  "use_sliding_window": False,
  "hidden_act": "silu",
  "eos_token_id": 151645,
}

KNOWN = {
  "openai-community/gpt2": _GPT2,
  "gpt2": _GPT2,
  "meta-llama/Llama-3.2-1B": {**_LLAMA32_1B, "eos_token_id": 128001},
  "meta-llama/Llama-3.2-1B-Instruct": _LLAMA32_1B,
  "meta-llama/Llama-3.1-8B": {**_LLAMA31_8B, "eos_token_id": 128001},
  "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
  "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": {**_LLAMA31_8B, "eos_token_id": 128001},
  "Qwen/QwQ-32B": _QWEN2_32B,
  "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": {
    **_QWEN2_32B,
    "max_position_embeddings": 131072,
    "eos_token_id": 151643,
  },
}
