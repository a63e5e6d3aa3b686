"""Loader tests: HF dirs (safetensors, .bin, shards, bf16), GGUF, hub ids, errors, LoRA, Generator.

Fast tests use tiny random HF models saved in tmp dirs; the slow ones compare SmolLM2 (GGUF) with
HF transformers loading the same file.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import json
import os
import shutil
import struct
import sys

import assets
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tiny_hf
from flax import nnx

from codi_jax.decoding import Generator
from codi_jax.errors import InputError
from codi_jax.models import hf, layout, loader, weights_io
from codi_jax.models.config import LoRAConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 100  # tiny vocabulary: "<eos>" (0), "<unk>" (1), "w2" ... "w99"
TOL = 1e-4
IDS = np.array([[5, 17, 42, 8, 99, 3, 64], [1, 2, 3, 4, 5, 6, 7]])
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _hf_config(arch: str):
  special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
  if arch == "gpt2":
    return transformers.GPT2Config(
      vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, **special
    )
  kw = dict(
    vocab_size=V,
    **tiny_hf.HF_SIZES,
    num_hidden_layers=2,
    max_position_embeddings=64,
    **special,
  )
  if arch == "llama":
    return transformers.LlamaConfig(
      **kw, tie_word_embeddings=False, rope_theta=1000.0, rms_norm_eps=1e-5
    )
  return transformers.Qwen2Config(**kw, tie_word_embeddings=True)


def _hf_model(arch: str, seed: int = 0):
  """A random HF model in eval mode, perturbed so that norms and biases are not trivial."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(_hf_config(arch)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _write_tokenizer(directory):
  """A whitespace word-level tokenizer over V ids: tokenizer.json + tokenizer_config.json."""
  import tokenizers  # pylint: disable=import-outside-toplevel

  vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, V)}}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  backend.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<eos>"}, f)


def save_tiny(model, directory, **save_kw) -> str:
  """save_pretrained + our tiny tokenizer; returns the directory."""
  os.makedirs(directory, exist_ok=True)
  model.save_pretrained(directory, **save_kw)
  _write_tokenizer(directory)
  return str(directory)


def _forward(model, ids) -> np.ndarray:
  """Full-sequence logits [B, L, V] of our model (jitted)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, ids):
    m = nnx.merge(graphdef, state)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return m(ids, positions=pos).logits

  return np.asarray(fn(state, jnp.asarray(ids, jnp.int32)))


def _ref_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


def _max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _input_error(spec, *needles, **kw) -> str:
  """Asserts loader.load(spec) raises a one-line InputError containing every needle."""
  with pytest.raises(InputError) as info:
    loader.load(spec, **kw)
  msg = str(info.value)
  assert "\n" not in msg, msg
  for n in needles:
    assert str(n) in msg, msg
  return msg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """arch -> (HF model dir with safetensors + tokenizer, the HF model)."""
  out = {}
  for arch in ("gpt2", "llama", "qwen2"):
    model = _hf_model(arch)
    out[arch] = (save_tiny(model, tmp_path_factory.mktemp(arch)), model)
  return out


def _copy_dir(src, dst) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def _smol_path() -> str:
  return assets.smollm2_path()


# ---------------------------------------------------------------------------------------------
# HF directories


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_hf_dir_safetensors_logits(tiny, arch):
  path, ref = tiny[arch]
  loaded = loader.load(path)
  assert loaded.source == path
  assert _max_diff(_forward(loaded.model, IDS), _ref_logits(ref, IDS)) < TOL
  assert loaded.tokenizer.encode("w5 w17 w42") == [5, 17, 42]
  assert loaded.tokenizer.eos_ids == (0,)


def test_config_from_hf_fields(tiny):
  gpt2, llama, qwen2 = (loader.load(tiny[a][0]).config for a in ("gpt2", "llama", "qwen2"))
  assert (gpt2.arch, gpt2.d_model, gpt2.num_heads, gpt2.d_ff, gpt2.max_positions) == (
    "gpt2",
    32,
    4,
    128,
    64,
  )
  assert gpt2.tie_embeddings and gpt2.num_kv_heads == 4
  assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.d_ff) == (4, 2, 8, 64)
  assert llama.rope_theta == 1000.0 and llama.norm_eps == 1e-5 and not llama.tie_embeddings
  assert not llama.qkv_bias and llama.rope_scaling is None
  assert qwen2.qkv_bias and qwen2.tie_embeddings and qwen2.vocab_size == V
  # Legacy (transformers 4) field names and llama3 RoPE scaling.
  cfg = hf.config_from_hf(
    {
      "model_type": "mistral",
      "vocab_size": 10,
      "hidden_size": 16,
      "num_attention_heads": 2,
      "num_hidden_layers": 1,
      "intermediate_size": 32,
      "rope_theta": 5e5,
      "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
      },
    }
  )
  assert (
    cfg.arch == "llama" and cfg.num_kv_heads == 2 and cfg.head_dim == 8 and cfg.rope_theta == 5e5
  )
  assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.factor == 8.0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_pytorch_bin_dir(tiny, tmp_path, arch):
  _, ref = tiny[arch]
  torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
  with open(tmp_path / "config.json", "w") as f:
    json.dump(ref.config.to_dict(), f)
  _write_tokenizer(tmp_path)
  loaded = loader.load(str(tmp_path))
  assert _max_diff(_forward(loaded.model, IDS), _ref_logits(ref, IDS)) < TOL


def test_pytorch_bin_without_torch(tiny, tmp_path, monkeypatch):
  path = _copy_dir(tiny["llama"][0], tmp_path / "m")
  os.remove(os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
    f.write(b"unused")
  monkeypatch.setitem(sys.modules, "torch", None)
  _input_error(path, "pytorch_model.bin", "pip install torch")


def test_sharded_checkpoint(tiny, tmp_path):
  ref = tiny["qwen2"][1]
  path = save_tiny(ref, tmp_path / "sharded", max_shard_size="20KB")
  shards = [n for n in os.listdir(path) if n.endswith(".safetensors")]
  assert len(shards) > 1 and os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
  loaded = loader.load(path)
  assert _max_diff(_forward(loaded.model, IDS), _ref_logits(ref, IDS)) < TOL


def test_bf16_safetensors(tiny, tmp_path):
  ref = _hf_model("llama").to(torch.bfloat16)
  path = save_tiny(ref, tmp_path / "bf16")
  tensors = weights_io.read_safetensors(os.path.join(path, "model.safetensors"))
  name = "model.layers.1.self_attn.q_proj.weight"
  assert tensors[name].dtype == ml_dtypes.bfloat16
  want = ref.state_dict()[name].float().numpy()
  np.testing.assert_array_equal(tensors[name].astype(np.float32), want)
  loaded = loader.load(path)  # f32 compute and params: bf16 values upcast exactly
  q = loaded.model.blocks.q_proj.kernel[1]  # stacked layers: layer 1
  assert q.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(q), want.T)
  # A fresh f32 HF model from the bf16 file (ref.float() would keep bf16-rounded RoPE buffers).
  ref32 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  assert _max_diff(_forward(loaded.model, IDS), _ref_logits(ref32, IDS)) < TOL
  half = loader.load(path, dtype="bfloat16", param_dtype="bfloat16")
  assert half.model.blocks.q_proj.kernel[1].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(half.model.blocks.q_proj.kernel[1], np.float32), want.T)


def test_safetensors_roundtrip(tmp_path):
  safetensors_torch = pytest.importorskip("safetensors.torch")
  rng = np.random.default_rng(0)
  tensors = {
    "f32": rng.normal(size=(3, 5)).astype(np.float32),
    "bf16": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
    "f16": rng.normal(size=(2, 2, 2)).astype(np.float16),
    "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
    "i64": np.array([-1, 2**40], np.int64),
    "mask": np.array([True, False, True]),
  }
  path = str(tmp_path / "x.safetensors")
  weights_io.write_safetensors(path, tensors)
  back = weights_io.read_safetensors(path)
  assert set(back) == set(tensors)
  for k, v in tensors.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k], v)
  # The official reader agrees (format check), bf16 included.
  theirs = safetensors_torch.load_file(path)
  for k, v in tensors.items():
    np.testing.assert_array_equal(theirs[k].float().numpy(), np.asarray(v, np.float32), k)


def test_safetensors_scalar(tmp_path):
  path = str(tmp_path / "s.safetensors")
  weights_io.write_safetensors(path, {"s": np.array(1.5, np.float32)})
  assert weights_io.read_safetensors(path)["s"].shape == ()


def test_read_safetensors_written_by_hf(tiny):
  path, ref = tiny["qwen2"]
  ours = weights_io.read_safetensors(os.path.join(path, "model.safetensors"))
  theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert set(ours) <= set(theirs)  # the tied lm_head.weight is not saved
  for k, v in ours.items():
    np.testing.assert_array_equal(v, theirs[k], k)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_export_tensors_roundtrip(tiny, tmp_path, arch):
  path, ref = tiny[arch]
  loaded = loader.load(path)
  exported = hf.export_tensors(loaded.model)
  theirs = {hf.strip_prefix(k): v.numpy() for k, v in ref.state_dict().items()}
  assert set(exported) <= set(theirs)
  for k, v in exported.items():
    np.testing.assert_array_equal(v, theirs[k], k)
  out = tmp_path / "export"
  out.mkdir()
  shutil.copy(os.path.join(path, "config.json"), out / "config.json")
  _write_tokenizer(out)
  weights_io.write_safetensors(str(out / "model.safetensors"), exported)
  again = loader.load(str(out))
  np.testing.assert_array_equal(_forward(again.model, IDS), _forward(loaded.model, IDS))


def test_gpt2_tokenizer_json(tiny, tmp_path):
  tokenizer_bpe = pytest.importorskip("codi_jax.models.tokenizer_bpe")
  path = _copy_dir(tiny["gpt2"][0], tmp_path / "m")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    os.remove(os.path.join(path, name))
  try:
    gpt2 = tokenizer_bpe.gpt2_default()
  except InputError as e:
    pytest.skip(str(e))
  gpt2.backend.save(os.path.join(path, "tokenizer.json"))
  loaded = loader.load(path)
  assert loaded.tokenizer.encode("The answer is:") == [464, 3280, 318, 25]


# ---------------------------------------------------------------------------------------------
# GGUF (tiny files written like llama.cpp's converter)


def _gguf_tokenizer(writer):
  tokens = [chr(33 + i) for i in range(94)] + ["ab", "abc", "Ġa", "Ġ", "<s>", "</s>"]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens)
  writer.add_token_types([1] * 98 + [3, 3])
  writer.add_token_merges(["a b", "ab c", "Ġ a"])
  writer.add_bos_token_id(98)
  writer.add_eos_token_id(99)


def _permute(w, n_heads):
  """llama.cpp's Q/K row permutation (HF rotate-half -> interleaved RoPE)."""
  return (
    w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def _write_gguf(path, arch: str, sd: dict[str, np.ndarray]) -> str:
  gguf = pytest.importorskip("gguf")
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(2)
  w.add_embedding_length(32)
  w.add_head_count(4)
  w.add_context_length(64)
  _gguf_tokenizer(w)
  if arch == "llama":
    w.add_feed_forward_length(64)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(1000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_rope_dimension_count(8)
    names = {
      "input_layernorm": "attn_norm",
      "self_attn.q_proj": "attn_q",
      "self_attn.k_proj": "attn_k",
      "self_attn.v_proj": "attn_v",
      "self_attn.o_proj": "attn_output",
      "post_attention_layernorm": "ffn_norm",
      "mlp.gate_proj": "ffn_gate",
      "mlp.up_proj": "ffn_up",
      "mlp.down_proj": "ffn_down",
    }
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(2):
      for ours, theirs in names.items():
        a = sd[f"model.layers.{i}.{ours}.weight"]
        if theirs in ("attn_q", "attn_k"):
          a = _permute(a, 4 if theirs == "attn_q" else 2)
        w.add_tensor(f"blk.{i}.{theirs}.weight", np.ascontiguousarray(a))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
  else:
    w.add_feed_forward_length(128)
    w.add_layer_norm_eps(1e-5)
    names = {
      "ln_1": "attn_norm",
      "attn.c_attn": "attn_qkv",
      "attn.c_proj": "attn_output",
      "ln_2": "ffn_norm",
      "mlp.c_fc": "ffn_up",
      "mlp.c_proj": "ffn_down",
    }
    w.add_tensor("token_embd.weight", sd["transformer.wte.weight"])
    w.add_tensor("position_embd.weight", sd["transformer.wpe.weight"])
    for i in range(2):
      for ours, theirs in names.items():
        for leaf in ("weight", "bias"):
          a = sd[f"transformer.h.{i}.{ours}.{leaf}"]
          a = a.T if a.ndim == 2 else a  # Conv1D [in, out] -> [out, in]
          w.add_tensor(f"blk.{i}.{theirs}.{leaf}", np.ascontiguousarray(a))
    w.add_tensor("output_norm.weight", sd["transformer.ln_f.weight"])
    w.add_tensor("output_norm.bias", sd["transformer.ln_f.bias"])
    w.add_tensor(
      "output.weight", sd["transformer.wte.weight"]
    )  # llama.cpp duplicates the tied head
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_gguf_logits(tiny, tmp_path, arch):
  ref = tiny[arch][1]
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  path = _write_gguf(tmp_path / "tiny.gguf", arch, sd)
  if arch == "llama":  # the file is what HF's own GGUF reader expects
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32
    ).eval()
    assert _max_diff(_ref_logits(theirs, IDS), _ref_logits(ref, IDS)) == 0.0
  loaded = loader.load(path)
  assert loaded.source == path and loaded.config.arch == arch and loaded.config.vocab_size == V
  assert _max_diff(_forward(loaded.model, IDS), _ref_logits(ref, IDS)) < TOL
  assert (loaded.tokenizer.bos_id, loaded.tokenizer.eos_ids) == (98, (99,))
  assert loaded.tokenizer.encode("abc a!") == [95, 96, 0]


# ---------------------------------------------------------------------------------------------
# Hub ids


def test_hub_id_downloads(tiny, monkeypatch):
  huggingface_hub = pytest.importorskip("huggingface_hub")
  calls = []

  def fake_snapshot_download(repo_id, **kw):
    calls.append((repo_id, kw))
    return tiny["llama"][0]

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  loaded = loader.load("someorg/tiny-llama")
  assert [c[0] for c in calls] == ["someorg/tiny-llama"]
  assert "*.safetensors" in calls[0][1].get("allow_patterns", ["*.safetensors"])
  assert loaded.source == tiny["llama"][0]
  assert _max_diff(_forward(loaded.model, IDS), _ref_logits(tiny["llama"][1], IDS)) < TOL


def test_hub_id_offline(tmp_path, monkeypatch):
  huggingface_hub = pytest.importorskip("huggingface_hub")
  # The constants are read at import; patch them as well as the environment.
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
  _input_error("someorg/not-a-model", "someorg/not-a-model", "hub")


# ---------------------------------------------------------------------------------------------
# Bad input: one-line InputError naming the path or argument


def test_empty_spec():
  _input_error("", "--model", "empty")


def test_missing_path(tmp_path):
  _input_error(str(tmp_path / "nope"), str(tmp_path / "nope"), "no such file or directory")
  _input_error(str(tmp_path / "nope.gguf"), "nope.gguf")


def test_not_a_model_file(tmp_path):
  path = tmp_path / "weights.txt"
  path.write_text("hello")
  _input_error(str(path), str(path), "not a model")


def test_dir_without_config(tmp_path):
  _input_error(str(tmp_path), str(tmp_path), "config.json")


def test_unsupported_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
  _input_error(str(tmp_path), str(tmp_path / "config.json"), "unsupported architecture", "bert")


def test_malformed_config(tiny, tmp_path):
  path = _copy_dir(tiny["llama"][0], tmp_path / "m")
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write('{"model_type": "llama",')
  _input_error(path, os.path.join(path, "config.json"), "invalid JSON")


def test_config_missing_field(tiny, tmp_path):
  path = _copy_dir(tiny["llama"][0], tmp_path / "m")
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  del cfg["hidden_size"]
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  _input_error(path, "config.json", "hidden_size")


def test_config_not_an_object(tiny, tmp_path):
  path = _copy_dir(tiny["llama"][0], tmp_path / "m")
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write("[1, 2]")
  _input_error(path, "config.json")


def test_config_not_text(tiny, tmp_path):
  path = _copy_dir(tiny["llama"][0], tmp_path / "m")
  with open(os.path.join(path, "config.json"), "wb") as f:
    f.write(b"\xff\xfe\x00binary")
  _input_error(path, "config.json")


def test_missing_weights(tiny, tmp_path):
  path = _copy_dir(tiny["llama"][0], tmp_path / "m")
  os.remove(os.path.join(path, "model.safetensors"))
  _input_error(path, path, "no weights")


def _rewrite_weights(path, edit):
  file = os.path.join(path, "model.safetensors")
  tensors = {k: np.array(v) for k, v in weights_io.read_safetensors(file).items()}
  edit(tensors)
  weights_io.write_safetensors(file, tensors)


def test_missing_tensor(tiny, tmp_path):
  path = _copy_dir(tiny["llama"][0], tmp_path / "m")
  _rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  _input_error(path, path, "missing tensor", "layers.1.mlp.up_proj.weight")


def test_wrong_shape(tiny, tmp_path):
  path = _copy_dir(tiny["llama"][0], tmp_path / "m")

  def edit(t):
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)

  _rewrite_weights(path, edit)
  _input_error(path, path, "layers.0.self_attn.k_proj.weight", "shape", "(8, 32)", "(16, 32)")


def test_unexpected_tensor(tiny, tmp_path):
  path = _copy_dir(tiny["llama"][0], tmp_path / "m")

  def edit(t):
    t["model.layers.0.self_attn.extra.weight"] = np.zeros((2,), np.float32)

  _rewrite_weights(path, edit)
  _input_error(path, path, "unexpected", "layers.0.self_attn.extra.weight")


def test_truncated_safetensors(tiny, tmp_path):
  path = _copy_dir(tiny["llama"][0], tmp_path / "m")
  file = os.path.join(path, "model.safetensors")
  with open(file, "rb") as f:
    data = f.read()
  with open(file, "wb") as f:
    f.write(data[: len(data) // 2])
  _input_error(path, file, "truncated")
  with open(file, "wb") as f:
    f.write(data[:4])
  _input_error(path, file)


def test_safetensors_garbage(tiny, tmp_path):
  path = _copy_dir(tiny["llama"][0], tmp_path / "m")
  file = os.path.join(path, "model.safetensors")
  with open(file, "wb") as f:
    f.write(b"not safetensors at all, just text")
  _input_error(path, file)


@pytest.mark.parametrize(
  "meta",
  [
    {"x": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 8]}},
    {"x": {"dtype": "F32", "shape": [3, 3]}},
  ],
)
def test_safetensors_bad_header(tmp_path, meta):
  file = str(tmp_path / "x.safetensors")
  header = json.dumps(meta).encode()
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + bytes(8))
  with pytest.raises(InputError, match="x.safetensors"):
    weights_io.read_safetensors(file)


def test_shard_index_errors(tiny, tmp_path):
  path = save_tiny(tiny["qwen2"][1], tmp_path / "sharded", max_shard_size="20KB")
  index = os.path.join(path, "model.safetensors.index.json")
  shard = max(n for n in os.listdir(path) if n.endswith(".safetensors"))
  os.remove(os.path.join(path, shard))
  _input_error(path, shard)
  with open(index, "w") as f:
    f.write('{"metadata": {}}')
  _input_error(path, index, "malformed index")


def test_corrupt_pytorch_bin(tiny, tmp_path):
  path = _copy_dir(tiny["llama"][0], tmp_path / "m")
  os.remove(os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
    f.write(b"garbage")
  with pytest.raises(InputError, match="pytorch_model.bin: cannot read"):
    loader.load(path)


def test_corrupt_pytorch_bin_one_line(tiny, tmp_path):
  path = _copy_dir(tiny["llama"][0], tmp_path / "m")
  os.remove(os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
    f.write(b"garbage")
  _input_error(path, "pytorch_model.bin", "cannot read")


def test_not_gguf_with_suffix(tmp_path):
  path = tmp_path / "fake.gguf"
  path.write_bytes(b"this is not a GGUF file, only text" * 10)
  _input_error(str(path), str(path), "GGUF")


def test_unsupported_gguf_architecture(tmp_path):
  gguf = pytest.importorskip("gguf")
  path = str(tmp_path / "bert.gguf")
  w = gguf.GGUFWriter(path, "bert")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  _input_error(path, path, "unsupported architecture", "bert")


@pytest.mark.parametrize("fraction", ["1MB", "half"])
def test_truncated_gguf(tmp_path, fraction):
  src = _smol_path()
  n = (1 << 20) if fraction == "1MB" else os.path.getsize(src) // 2
  path = tmp_path / "cut.gguf"
  with open(src, "rb") as f:
    path.write_bytes(f.read(n))
  _input_error(str(path), str(path), "GGUF" if fraction == "1MB" else "truncated")


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_adapters(tiny):
  path, _ = tiny["llama"]
  base = loader.load(path)
  lora = loader.load(path, lora=LoRAConfig(rank=4, alpha=8))
  assert lora.config.lora == LoRAConfig(rank=4, alpha=8)
  per_layer = layout.per_layer(nnx.to_flat_state(nnx.state(lora.model)))  # either layout
  flat = {".".join(map(str, p)): v for p, v in per_layer}
  for i in range(2):
    for target in LLAMA_TARGETS:
      a, b = flat[f"blocks.{i}.{target}.lora_a"], flat[f"blocks.{i}.{target}.lora_b"]
      kernel = flat[f"blocks.{i}.{target}.kernel"]
      assert a.shape == (kernel.shape[0], 4) and b.shape == (4, kernel.shape[1]), target
      assert np.abs(np.asarray(a)).max() > 0 and not np.asarray(b).any(), target
  assert sum(k.endswith("lora_a") for k in flat) == 2 * len(LLAMA_TARGETS)
  np.testing.assert_allclose(_forward(lora.model, IDS), _forward(base.model, IDS), atol=1e-6)
  lora_params = nnx.state(lora.model, nnx.LoRAParam)
  assert len(list(layout.per_layer(nnx.to_flat_state(lora_params)))) == 2 * 2 * len(LLAMA_TARGETS)


# ---------------------------------------------------------------------------------------------
# Generator


def _hf_greedy(ref, prompt, max_new, eos) -> list[int]:
  with torch.no_grad():
    out = ref.generate(
      torch.tensor([prompt]),
      attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
      do_sample=False,
      max_new_tokens=max_new,
      eos_token_id=eos,
      pad_token_id=eos,
    )
  return out[0, len(prompt) :].tolist()


def test_generator_compiles_once_per_shape(tiny):
  path, ref = tiny["llama"]
  gen = Generator(loader.load(path).model, pad_id=0, eos_ids=[11])
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
  first = gen(prompts, 6)
  assert gen.compiles == 1
  for prompt, out in zip(prompts, first):  # left-padded batch == HF on each prompt alone
    assert out == _hf_greedy(ref, prompt, 6, 11), prompt
  second = gen([[13] * 7, list(range(2, 22))], 6)  # same batch size, bucket 32 and max_new
  assert gen.compiles == 1 and len(second) == 2
  assert gen(prompts, 6) == first
  gen([list(range(2, 42)), [6, 7]], 6)  # bucket 64
  assert gen.compiles == 2
  gen([[13] * 50, list(range(3, 30))], 6)  # bucket 64 again
  assert gen.compiles == 2


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_generator_matches_hf_greedy(tiny, arch):
  path, ref = tiny[arch]
  loaded = loader.load(path)
  prompts = [[5, 17, 42], [9] + list(range(30, 50)), [77], [3, 4, 5, 6, 7, 8, 9, 10]]
  eos = 11
  outs = Generator(loaded.model, pad_id=0, eos_ids=[eos])(prompts, 8, length_bucket=8)
  for prompt, out in zip(prompts, outs):
    assert out == _hf_greedy(ref, prompt, 8, eos), prompt


def test_generator_rejects_zero_tokens(tiny):
  gen = Generator(loader.load(tiny["qwen2"][0]).model, pad_id=0, eos_ids=[0])
  with pytest.raises(ValueError):
    gen([[1, 2]], 0)


# ---------------------------------------------------------------------------------------------
# SmolLM2 (real weights, slow)


@pytest.fixture(scope="module")
def smol():
  _smol_path()
  return loader.load("smollm2")


@pytest.fixture(scope="module")
def smol_ref():
  """HF transformers' model and tokenizer from the same GGUF file (f32)."""
  pytest.importorskip("gguf")
  pytest.importorskip("accelerate")
  directory = os.path.dirname(_smol_path())
  model = transformers.AutoModelForCausalLM.from_pretrained(
    directory, gguf_file=SMOL_GGUF, dtype=torch.float32
  ).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=SMOL_GGUF)
  return model, tokenizer


def _smol_prompts(tokenizer) -> list[str]:
  chat = [
    [{"role": "user", "content": "What is 12 + 7?"}],
    [
      {"role": "system", "content": "You are terse."},
      {"role": "user", "content": "Name three colors."},
    ],
  ]
  return [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    *(tokenizer.apply_chat_template(m) for m in chat),
  ]


@pytest.mark.slow
def test_smollm2_config(smol):
  cfg = smol.config
  assert (cfg.arch, cfg.num_layers, cfg.d_model, cfg.d_ff) == ("llama", 30, 576, 1536)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
  assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.max_positions == 8192
  assert smol.source.endswith(SMOL_GGUF)
  assert smol.tokenizer.eos_ids == (2,)


@pytest.mark.slow
def test_smollm2_prompt_ids_match_hf(smol, smol_ref):
  _, ref_tok = smol_ref
  tok = smol.tokenizer
  for text in _smol_prompts(tok):
    assert tok.encode(text, add_special_tokens=True) == ref_tok.encode(text), text
  messages = [{"role": "user", "content": "What is 12 + 7?"}]
  assert tok.apply_chat_template(messages) == ref_tok.apply_chat_template(
    messages, tokenize=False, add_generation_prompt=True
  )


@pytest.mark.slow
def test_smollm2_logits_match_hf(smol, smol_ref):
  ref, _ = smol_ref
  ids = [smol.tokenizer.encode(_smol_prompts(smol.tokenizer)[2])]
  ours, theirs = _forward(smol.model, ids), _ref_logits(ref, ids)
  diff = _max_diff(ours, theirs)
  print(f"SmolLM2 max |logit diff| vs HF: {diff:.3g} (max |logit| {np.abs(theirs).max():.3g})")
  assert diff < 1e-3
  assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.slow
def test_smollm2_greedy_matches_hf(smol, smol_ref):
  ref, _ = smol_ref
  tok = smol.tokenizer
  prompts = [tok.encode(t, add_special_tokens=True) for t in _smol_prompts(tok)]
  assert len({len(p) for p in prompts}) == len(prompts)  # one batch of different lengths
  gen = Generator(smol.model, pad_id=tok.pad_id, eos_ids=tok.eos_ids)
  outs = gen(prompts, 32)  # batched, left padded
  for prompt, out in zip(prompts, outs):
    assert out == _hf_greedy(ref, prompt, 32, tok.eos_id), tok.decode(prompt)
