"""Checkpoints of the official CODI code (zhenyi4/codi) in and out of our parameters.

The official `Trainer.save_model` writes the whole `CODI` module's state dict (`pytorch_model.bin`
or `model.safetensors`, possibly sharded): keys `codi.base_model.model.<HF keys>` (peft:
`<module>.base_layer.weight` / `.bias`, `<module>.lora_A.default.weight` [r, in],
`<module>.lora_B.default.weight` [out, r]; GPT-2's Conv1D base weights stay [in, out]), the resized
embedding (V + 3 rows: pad, bot, eot) and the projection `prj.1.*`, `prj.3.*` (Linears), `prj.ln.*`.
The base model's `config.json` and tokenizer come from its own directory (docs/codi.md 8).

`load_official` builds a ready model from such a checkpoint plus the base directory;
`official_tensors` writes our model back in the same layout (`codi_jax.export` puts it in
`<out>/codi/`, beside a `codi_config.json` recording the settings the layout does not hold: LoRA
alpha, thought count, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from codi_jax.codi.model import Codi
from codi_jax.data.codi_batches import SpecialIds
from codi_jax.errors import InputError
from codi_jax.models import hf, layout, loader, tokenizer_hf, weights_io
from codi_jax.models.config import LoRAConfig, ModelConfig
from codi_jax.models.tokenizer import Tokenizer

_PREFIX = "codi.base_model.model."  # peft-wrapped backbone (every reference script uses LoRA)
_PLAIN = "codi."  # a backbone saved without peft
_LORA = re.compile(r"^(.*)\.lora_([AB])\.default\.weight$")
SETTINGS_FILE = "codi_config.json"
# The reference scripts' values (docs/codi.md 2.3, 7.1); the LoRA rank is read off the checkpoint.
DEFAULT_LORA_ALPHA = 32.0
DEFAULT_NUM_LATENT = 6


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """The state dict of a checkpoint directory (`model.safetensors`, sharded
  `model.safetensors.index.json` + shards, or `pytorch_model.bin` when torch is installed) or file.
  """
  if os.path.isdir(path):
    return weights_io.read_hf_weights(path)
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file or directory")
  if os.path.basename(path) == "model.safetensors.index.json":
    return weights_io.read_hf_weights(os.path.dirname(path) or ".")
  if path.endswith(".safetensors"):
    return weights_io.read_safetensors(path)
  if path.endswith(".bin"):
    return weights_io.read_torch_bin(path)
  raise InputError(
    f"{path}: not a checkpoint (expected a .safetensors, .bin or model.safetensors.index.json "
    "file, or a directory holding one)"
  )


def _split(sd: dict[str, np.ndarray], where: str):
  """(backbone tensors under HF names, LoRA tensors by (module, A|B), prj tensors)."""
  base, lora, prj, other = {}, {}, {}, []
  for k, v in sd.items():
    if k.startswith(_PREFIX) or k.startswith(_PLAIN):
      key = k[len(_PREFIX if k.startswith(_PREFIX) else _PLAIN) :]
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
    raise InputError(f"{where}: unexpected keys outside codi.* and prj.*: {sorted(other)[:5]}")
  return base, lora, prj


def _embedding_rows(base: dict[str, np.ndarray]) -> int | None:
  wte = next(
    (v for k, v in base.items() if k.endswith(("wte.weight", "embed_tokens.weight"))), None
  )
  return None if wte is None else int(wte.shape[0])


def import_official(path: str, backbone_cfg: ModelConfig, **module_options) -> Codi:
  """A Codi whose backbone, LoRA adapters and projection come from an official checkpoint.

  backbone_cfg must describe the resized model (vocab V + 3) with the LoRA rank/alpha used in
  training; module_options are `Codi`'s (e.g. use_prj). Strict: missing, unexpected or mis-shaped
  tensors raise InputError naming them.
  """
  return _import(read_checkpoint(path), backbone_cfg, path, module_options)


def _import(
  sd: dict[str, np.ndarray], backbone_cfg: ModelConfig, path: str, module_options
) -> Codi:
  base, lora, prj = _split(sd, path)
  rows = _embedding_rows(base)
  if rows != backbone_cfg.vocab_size:
    raise InputError(
      f"{path}: embedding has {rows} rows, expected {backbone_cfg.vocab_size} "
      "(vocabulary + pad/bot/eot)"
    )
  backbone = hf.assign(backbone_cfg, base, where=path)
  used, found = set(), {}
  lora_flat = nnx.to_flat_state(nnx.state(backbone, nnx.LoRAParam))  # aliases the model's
  for mod_path, value in layout.per_layer(lora_flat):  # the checkpoint names layers one by one
    module, _ = hf.hf_name(mod_path[:-1] + ("kernel",), backbone_cfg.arch)
    module = module[: -len(".weight")]
    which = "A" if mod_path[-1] == "lora_a" else "B"
    key = _find_lora(lora, module, which)
    if key is None:
      raise InputError(
        f"{path}: missing LoRA tensor {_PREFIX}...{module}.lora_{which}.default.weight"
      )
    # peft's factors are nn.Linear weights ([r, in], [out, r]) for Linear and Conv1D alike.
    arr = np.asarray(lora[key], np.float32).T
    if arr.shape != value.shape:
      raise InputError(
        f"{path}: LoRA tensor for {module} ({which}) has shape {arr.shape[::-1]}, "
        f"config implies {value.shape[::-1]}"
      )
    found[mod_path] = arr
    used.add(key)
  if set(lora) - used:
    raise InputError(
      f"{path}: LoRA tensors for modules the config does not adapt: "
      f"{sorted({k[0] for k in set(lora) - used})[:5]}"
    )
  for mod_path, var in lora_flat:
    var.set_value(jnp.asarray(layout.stacked_value(mod_path, backbone_cfg.num_layers, found.pop)))
  codi = Codi(backbone, rngs=nnx.Rngs(params=0), **module_options)
  _assign_prj(codi, prj, path)
  return codi


def _find_lora(lora, module: str, which: str):
  for name, w in lora:
    if w == which and (name == module or name.endswith("." + module)):
      return (name, w)
  return None


def _prj_keys(codi: Codi) -> dict:
  """Reference `prj` key -> (our variable, stored transposed?)."""
  p = codi.prj
  keys = {
    "prj.1.weight": (p.w1, True),
    "prj.1.bias": (p.b1, False),
    "prj.3.weight": (p.w2, True),
    "prj.3.bias": (p.b2, False),
  }
  if p.ln is not None:
    keys.update({"prj.ln.weight": (p.ln.scale, False), "prj.ln.bias": (p.ln.bias, False)})
  return keys


def _assign_prj(codi: Codi, prj: dict, path: str):
  if codi.prj is None:
    if prj:
      raise InputError(f"{path}: checkpoint has prj.* but use_prj=False")
    return
  want = _prj_keys(codi)
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
      shape = var.get_value().shape
      raise InputError(
        f"{path}: {k} has shape {np.shape(prj[k])}, expected {shape[::-1] if transpose else shape}"
      )
    var.set_value(jnp.asarray(arr))


# -------------------------------------------------------------------------------- loading whole


def read_settings(path: str) -> dict:
  """`codi_config.json` beside the checkpoint (written by `codi_jax.export`), or {} if absent."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  file = os.path.join(directory, SETTINGS_FILE)
  if not os.path.isfile(file):
    return {}
  try:
    with open(file, encoding="utf-8") as f:
      settings = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(f"{file}: cannot read ({e})") from None
  if not isinstance(settings, dict):
    raise InputError(f"{file}: expected a JSON object")
  return settings


@dataclasses.dataclass
class Official:
  """An official-layout checkpoint loaded on its base model, with the settings that were used."""

  codi: Codi
  tokenizer: Tokenizer
  special: SpecialIds
  settings: dict  # lora_rank, lora_alpha, use_prj, prj_dim, prj_layernorm, base_vocab_size, ...


def load_official(
  path: str,
  base: str,
  *,
  lora_rank: int | None = None,
  lora_alpha: float | None = None,
  dtype: str = "float32",
) -> Official:
  """The model of an official checkpoint `path` on the base HF directory `base` (config.json and
  tokenizer files; weights are not read from it).

  As the reference: pad/bot/eot are ids V, V+1, V+2 (V = the base config's vocab_size); `[PAD]` is
  added to the tokenizer only if it has no pad token. `base` may also be a `codi_jax.export`
  directory, whose config already counts the three rows. The LoRA rank is the checkpoint's
  (`lora_rank` only checks it), and so are the adapted modules; alpha defaults to the checkpoint's
  codi_config.json, else 32; the projection's presence, width and LayerNorm are read off its
  tensors. GPT-2's Conv1D weights and LoRA factors (fan_in_fan_out) are transposed as
  `import_official` does.
  """
  sd = read_checkpoint(path)
  saved = read_settings(path)
  base_sd, lora, prj = _split(sd, path)
  ranks = sorted({int(v.shape[0]) for (_, w), v in lora.items() if w == "A"})
  if len(ranks) > 1:
    raise InputError(f"{path}: LoRA tensors of different ranks {ranks}")
  found = ranks[0] if ranks else 0
  if lora_rank is not None and lora_rank != found:
    raise InputError(
      f"--lora_rank={lora_rank}: {path} has "
      + (f"LoRA rank {found} (rows of lora_A)" if found else "no LoRA tensors (rank 0)")
    )
  alpha = lora_alpha if lora_alpha is not None else saved.get("lora_alpha") or DEFAULT_LORA_ALPHA
  # The adapted modules, as our layer names spell them (`attn.c_proj`, `self_attn.q_proj`, ...).
  targets = tuple(sorted({".".join(name.split(".")[-2:]) for name, _ in lora}))
  lora_cfg = LoRAConfig(rank=found, alpha=float(alpha), targets=targets) if found else None

  kind, resolved = loader.resolve(base)
  if kind != "hf_dir":
    raise InputError(f"--base={base}: not a Hugging Face model directory (config.json + tokenizer)")
  where = os.path.join(resolved, "config.json")
  cfg = hf.config_from_hf(
    loader.read_hf_config(resolved), where=where, dtype=dtype, param_dtype=dtype, lora=lora_cfg
  )
  rows = _embedding_rows(base_sd)
  if rows is None:
    raise InputError(f"{path}: no embedding tensor (wte.weight / embed_tokens.weight)")
  if rows not in (cfg.vocab_size + 3, cfg.vocab_size):
    raise InputError(
      f"{path}: embedding has {rows} rows; {where} has vocab_size {cfg.vocab_size}, so expected "
      f"{cfg.vocab_size + 3} (pad/bot/eot appended)"
    )
  cfg = cfg.replace(vocab_size=rows)
  V = rows - 3
  options = {
    "use_prj": bool(prj),
    "prj_dim": int(prj["prj.1.weight"].shape[0]) if "prj.1.weight" in prj else 0,
    "prj_layernorm": "prj.ln.weight" in prj or "prj.ln.bias" in prj,
  }
  codi = _import(sd, cfg, path, options)

  tokenizer = tokenizer_hf.from_hf_dir(resolved)
  if tokenizer.eos_id is None:
    raise InputError(f"{resolved}: the tokenizer has no eos token (tokenizer_config.json)")
  if tokenizer.pad_id is None:  # the reference: [PAD], and pad_token_id = V
    tokenizer.add_special_tokens(["[PAD]"])
    tokenizer.pad_id = V
  ids = {"pad": V, "bot": V + 1, "eot": V + 2}
  want = saved.get("special_ids")
  if want is not None and {k: want.get(k) for k in ids} != ids:
    raise InputError(f"{path}: {SETTINGS_FILE} special_ids {want} differ from {ids} (V = {V})")
  special = SpecialIds(**ids, eos=tokenizer.eos_id)
  settings = {
    **saved,
    "lora_rank": found,
    "lora_alpha": lora_cfg.alpha if lora_cfg else None,
    "lora_targets": list(targets) if found else [],
    **options,
    "base_vocab_size": V,
    "dtype": dtype,
  }
  return Official(codi, tokenizer, special, settings)


# -------------------------------------------------------------------------------------- writing


def official_tensors(codi: Codi) -> dict[str, np.ndarray]:
  """Our model in the reference's layout (inverse of `import_official`): the unmerged base weights
  (trained pad/bot/eot rows written into the table; a tied head also as `lm_head.weight`, as a
  torch state dict has it) and, for adapted modules, peft's `base_layer` names plus
  `lora_A`/`lora_B` ([r, in] / [out, r]); the projection as `prj.1/3/ln`."""
  backbone = codi.backbone
  arch = backbone.cfg.arch
  out = {
    _PREFIX + hf.full_name(name, arch): arr for name, arr in hf.export_tensors(backbone).items()
  }
  if backbone.cfg.tie_embeddings:  # a torch state dict names the tied table twice
    embed = hf.full_name(hf.hf_name(("embed", "embedding"), arch)[0], arch)
    out[_PREFIX + "lm_head.weight"] = out[_PREFIX + embed]
  for mod_path, value in layout.per_layer(nnx.to_flat_state(nnx.state(backbone, nnx.LoRAParam))):
    module, _ = hf.hf_name(mod_path[:-1] + ("kernel",), arch)
    full = _PREFIX + hf.full_name(module, arch)[: -len(".weight")]
    for leaf in ("weight", "bias"):
      if f"{full}.{leaf}" in out:
        out[f"{full}.base_layer.{leaf}"] = out.pop(f"{full}.{leaf}")
    which = "A" if mod_path[-1] == "lora_a" else "B"
    out[f"{full}.lora_{which}.default.weight"] = np.asarray(value, np.float32).T
  if codi.prj is not None:
    for k, (var, transpose) in _prj_keys(codi).items():
      arr = np.asarray(var.get_value(), np.float32)
      out[k] = arr.T if transpose else arr
  return {k: np.ascontiguousarray(out[k]) for k in sorted(out)}


def settings_of(codi: Codi, special: SpecialIds, **extra) -> dict:
  """What `codi_config.json` records beside `official_tensors`: the settings the layout lacks."""
  lora = codi.backbone.cfg.lora
  return {
    "format": "CODI checkpoint (zhenyi4/codi key layout), written by codi_jax.export",
    "base_vocab_size": special.pad,
    "special_ids": dataclasses.asdict(special),
    "lora_rank": lora.rank if lora else 0,
    "lora_alpha": lora.alpha if lora else None,
    **extra,
  }
