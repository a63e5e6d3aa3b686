"""Import a checkpoint of the official CODI code (zhenyi4/codi) into our parameters.

The official `Trainer.save_model` writes the whole `CODI` module's state dict (`pytorch_model.bin`
or `model.safetensors`): keys `codi.base_model.model.<HF keys>` (peft: `<module>.base_layer.weight`,
`<module>.lora_A.default.weight` [r, in], `<module>.lora_B.default.weight` [out, r]), the resized
embedding (V + 3 rows: pad, bot, eot) and the projection `prj.1.*`, `prj.3.*` (Linears), `prj.ln.*`.
"""

from __future__ import annotations

import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from codi_jax.codi.model import Codi
from codi_jax.errors import InputError
from codi_jax.models import hf, weights_io
from codi_jax.models.config import ModelConfig

_PREFIX = "codi.base_model.model."
_LORA = re.compile(r"^(.*)\.lora_([AB])\.default\.weight$")


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """The state dict of a checkpoint file, or of the file inside a checkpoint directory."""
  if os.path.isdir(path):
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.isfile(os.path.join(path, name)):
        return read_checkpoint(os.path.join(path, name))
    raise InputError(f"{path}: no model.safetensors or pytorch_model.bin")
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file")
  return (
    weights_io.read_safetensors(path)
    if path.endswith(".safetensors")
    else weights_io.read_torch_bin(path)
  )


def import_official(path: str, backbone_cfg: ModelConfig, **module_options) -> Codi:
  """A Codi whose backbone, LoRA adapters and projection come from an official checkpoint.

  backbone_cfg must describe the resized model (vocab V + 3) with the LoRA rank/alpha used in
  training; module_options are `Codi`'s (e.g. use_prj). Strict: missing, unexpected or mis-shaped
  tensors raise InputError naming them.
  """
  sd = read_checkpoint(path)
  base, lora, prj, other = {}, {}, {}, []
  for k, v in sd.items():
    if k.startswith(_PREFIX):
      key = k[len(_PREFIX) :]
      m = _LORA.match(key)
      if m:
        lora[(m.group(1), m.group(2))] = v
      else:
        base[key.replace(".base_layer.", ".")] = v
    elif k.startswith("prj."):
      prj[k] = v
    else:
      other.append(k)
  if other:
    raise InputError(f"{path}: unexpected keys outside codi.* and prj.*: {other[:5]}")
  wte = next(
    (v for k, v in base.items() if k.endswith(("wte.weight", "embed_tokens.weight"))), None
  )
  if wte is None or wte.shape[0] != backbone_cfg.vocab_size:
    raise InputError(
      f"{path}: embedding has {None if wte is None else wte.shape[0]} rows, expected "
      f"{backbone_cfg.vocab_size} (vocabulary + pad/bot/eot)"
    )
  backbone = hf.assign(backbone_cfg, base, where=path)
  used = set()
  for mod_path, var in nnx.to_flat_state(nnx.state(backbone, nnx.LoRAParam)):
    module, _ = hf.hf_name(tuple(mod_path[:-1]) + ("kernel",), backbone_cfg.arch)
    module = module[: -len(".weight")]
    which = "A" if mod_path[-1] == "lora_a" else "B"
    key = _find_lora(lora, module, which)
    if key is None:
      raise InputError(
        f"{path}: missing LoRA tensor {_PREFIX}...{module}.lora_{which}.default.weight"
      )
    arr = np.asarray(
      lora[key], np.float32
    ).T  # peft Linear [r, in] / [out, r] -> ours [in, r] / [r, out]
    if arr.shape != var.get_value().shape:
      raise InputError(
        f"{path}: LoRA tensor for {module} ({which}) has shape {arr.shape[::-1]}, "
        f"config implies {var.get_value().shape[::-1]}"
      )
    var.set_value(jnp.asarray(arr))
    used.add(key)
  if set(lora) - used:
    raise InputError(
      f"{path}: LoRA tensors for modules the config does not adapt: "
      f"{sorted({k[0] for k in set(lora) - used})[:5]}"
    )
  codi = Codi(backbone, rngs=nnx.Rngs(params=0), **module_options)
  _assign_prj(codi, prj, path)
  return codi


def _find_lora(lora, module: str, which: str):
  for name, w in lora:
    if w == which and (name == module or name.endswith("." + module)):
      return (name, w)
  return None


def _assign_prj(codi: Codi, prj: dict, path: str):
  if codi.prj is None:
    if prj:
      raise InputError(f"{path}: checkpoint has prj.* but use_prj=False")
    return
  want = {
    "prj.1.weight": (codi.prj.w1, True),
    "prj.1.bias": (codi.prj.b1, False),
    "prj.3.weight": (codi.prj.w2, True),
    "prj.3.bias": (codi.prj.b2, False),
  }
  if codi.prj.ln is not None:
    want.update(
      {"prj.ln.weight": (codi.prj.ln.scale, False), "prj.ln.bias": (codi.prj.ln.bias, False)}
    )
  missing = sorted(set(want) - set(prj))
  extra = sorted(set(prj) - set(want))
  if missing or extra:
    raise InputError(
      f"{path}: projection keys do not match (missing {missing}, unexpected {extra})"
    )
  for k, (var, transpose) in want.items():
    arr = np.asarray(prj[k], np.float32)
    arr = arr.T if transpose else arr
    if arr.shape != var.get_value().shape:
      raise InputError(
        f"{path}: {k} has shape {np.shape(prj[k])}, expected {var.get_value().shape[::-1] if transpose else var.get_value().shape}"
      )
    var.set_value(jnp.asarray(arr))
