"""Importing an official CODI checkpoint (key layout of zhenyi4/codi) written here by the test."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax.codi.convert import import_official
from codi_jax.errors import InputError
from codi_jax.models import hf, weights_io
from codi_jax.models.config import LoRAConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, R, ALPHA = 61, 4, 8.0  # V already includes pad/bot/eot


def official_checkpoint(arch, rng):
  """(HF model with LoRA merged into its weights, official-layout state dict, our config)."""
  torch.manual_seed(0)
  if arch == "gpt2":
    c = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    targets = {
      "attn.c_attn": (16, 48),
      "attn.c_proj": (16, 16),
      "mlp.c_fc": (16, 64),
      "mlp.c_proj": (64, 16),
    }
    prefix = "transformer.h.{i}."
  else:
    c = transformers.LlamaConfig(
      vocab_size=V,
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=2,
      num_attention_heads=2,
      num_key_value_heads=1,
      max_position_embeddings=32,
    )
    targets = {
      "self_attn.q_proj": (16, 16),
      "self_attn.k_proj": (16, 8),
      "self_attn.v_proj": (16, 8),
      "self_attn.o_proj": (16, 16),
      "mlp.gate_proj": (16, 32),
      "mlp.up_proj": (16, 32),
      "mlp.down_proj": (32, 16),
    }
    prefix = "model.layers.{i}."
  c._attn_implementation = "eager"  # pylint: disable=protected-access
  ref = transformers.AutoModelForCausalLM.from_config(c).eval()
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  out = {}
  merged = dict(sd)
  for i in range(2):
    for mod, (din, dout) in targets.items():
      name = prefix.format(i=i) + mod
      a = rng.normal(size=(R, din)).astype(np.float32) * 0.3  # peft lora_A.weight [r, in]
      b = rng.normal(size=(dout, R)).astype(np.float32) * 0.3  # peft lora_B.weight [out, r]
      out[f"codi.base_model.model.{name}.lora_A.default.weight"] = a
      out[f"codi.base_model.model.{name}.lora_B.default.weight"] = b
      delta = (b @ a) * (ALPHA / R)  # [out, in]
      w = sd[name + ".weight"]
      merged[name + ".weight"] = w + (
        delta.T if arch == "gpt2" else delta
      )  # Conv1D stores [in, out]
      out[f"codi.base_model.model.{name}.base_layer.weight"] = w
      sd.pop(name + ".weight")
  for k, v in sd.items():
    out["codi.base_model.model." + k] = v
  d = 16
  out.update(
    {
      "prj.1.weight": rng.normal(size=(d, d)).astype(np.float32),
      "prj.1.bias": np.zeros(d, np.float32),
      "prj.3.weight": rng.normal(size=(d, d)).astype(np.float32),
      "prj.3.bias": np.ones(d, np.float32),
      "prj.ln.weight": np.full(d, 2.0, np.float32),
      "prj.ln.bias": np.zeros(d, np.float32),
    }
  )
  ref.load_state_dict({k: torch.tensor(v) for k, v in merged.items()})
  cfg = hf.config_from_hf(c.to_dict(), lora=LoRAConfig(rank=R, alpha=ALPHA))
  return ref, out, cfg


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
def test_import_matches_merged_reference(tmp_path, arch, fmt):
  ref, sd, cfg = official_checkpoint(arch, np.random.default_rng(0))
  path = str(tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"))
  if fmt == "safetensors":
    weights_io.write_safetensors(path, sd)
  elif fmt == "sharded":
    keys = sorted(sd)
    shards = {
      "model-00001-of-00002.safetensors": keys[:7],
      "model-00002-of-00002.safetensors": keys[7:],
    }
    for name, part in shards.items():
      weights_io.write_safetensors(str(tmp_path / name), {k: sd[k] for k in part})
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  else:
    torch.save({k: torch.tensor(v) for k, v in sd.items()}, path)
  codi = import_official(str(tmp_path), cfg)
  ids = np.random.default_rng(1).integers(0, V, (2, 9))
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  got = codi.backbone(jnp.asarray(ids), positions=jnp.broadcast_to(jnp.arange(9), (2, 9))).logits
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(np.asarray(codi.prj.w1[...]), sd["prj.1.weight"].T)
  np.testing.assert_array_equal(np.asarray(codi.prj.ln.scale[...]), sd["prj.ln.weight"])


def test_import_errors(tmp_path):
  _, sd, cfg = official_checkpoint("llama", np.random.default_rng(0))
  lora_key = next(k for k in sd if "lora_A" in k)
  for name, broken, msg in [
    ("missing_lora", {k: v for k, v in sd.items() if k != lora_key}, "missing LoRA tensor"),
    ("extra_key", {**sd, "optimizer.step": np.zeros(1, np.float32)}, "unexpected keys"),
    ("no_prj", {k: v for k, v in sd.items() if not k.startswith("prj.")}, "projection keys"),
  ]:
    path = tmp_path / f"{name}.safetensors"
    weights_io.write_safetensors(str(path), broken)
    with pytest.raises(InputError, match=msg):
      import_official(str(path), cfg)
  with pytest.raises(InputError, match="rows"):
    weights_io.write_safetensors(str(tmp_path / "ok.safetensors"), sd)
    import_official(str(tmp_path / "ok.safetensors"), cfg.replace(vocab_size=V - 3))
  (tmp_path / "model.npz").write_bytes(b"")
  with pytest.raises(InputError, match="not a checkpoint"):
    import_official(str(tmp_path / "model.npz"), cfg)
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match="no weights"):
    import_official(str(tmp_path / "empty"), cfg)
