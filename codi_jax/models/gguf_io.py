"""GGUF files (llama.cpp): config from metadata, tensors dequantized with the `gguf` package.

Tensors are renamed to HF keys so that one strict assignment path (`hf.assign`) serves both formats.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct

import numpy as np

from codi_jax.errors import InputError
from codi_jax.models.config import LoRAConfig, ModelConfig, RopeScaling
from codi_jax.models.weights_io import bounded_product, check_tensor


def open_reader(path: str):
  """A GGUFReader, with a one-line InputError for a missing, truncated, corrupt or hostile file.

  The header is walked and bounded first (`check_layout`): GGUFReader memory-maps the file and
  trusts its counts, lengths and shapes.
  """
  import gguf  # pylint: disable=import-outside-toplevel

  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file")
  size = check_layout(path)
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(
      f"{path}: not a valid GGUF file (truncated or corrupt: {type(e).__name__}: {e})"
    ) from None
  for t in reader.tensors:
    n = math.prod(int(d) for d in t.shape)
    if n != t.n_elements:
      raise InputError(f"{path}: tensor {t.name!r} shape {list(t.shape)} overflows")
    if t.data_offset + t.n_bytes > size:
      raise InputError(f"{path}: truncated (tensor {t.name!r} ends past the end of the file)")
  return reader


# Bounds no real GGUF approaches. GGUFReader builds about 1 KB of numpy objects per metadata array
# item, so the item budget also bounds its memory (Gemma 3's tokenizer has ~0.8M items).
MAX_COUNT = 1_000_000  # tensors, and metadata keys
MAX_ARRAY_ITEMS = 2_000_000  # all metadata array items together
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME = 256  # tensor names (the spec allows 64)
_MAX_NESTING = 4  # arrays of arrays
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_UINT32, _STRING, _ARRAY = 4, 8, 9
_MIN_KV = 13  # bytes: key length, value type, a 1-byte value
_MIN_TENSOR_INFO = 24  # bytes: name length, rank, type, offset


class _Corrupt(Exception):
  """The header does not describe a well-formed file; the message says where."""


class _Cursor:
  """Reads a GGUF header from a memory map, checking every length against the bytes left."""

  def __init__(self, buf, endian: str, pos: int):
    self.buf, self.endian, self.pos, self.size = buf, endian, pos, len(buf)
    self.items = 0

  @property
  def left(self) -> int:
    return self.size - self.pos

  def take(self, n: int, what: str) -> int:
    if n > self.left:
      raise _Corrupt(f"{what} at byte {self.pos} needs {n} bytes, {self.left} left")
    self.pos += n
    return self.pos - n

  def uint(self, nbytes: int, what: str) -> int:
    fmt = self.endian + ("I" if nbytes == 4 else "Q")
    return struct.unpack_from(fmt, self.buf, self.take(nbytes, what))[0]

  def string(self, what: str, limit: int | None = None) -> bytes:
    n = self.uint(8, what + " length")
    if limit is not None and n > limit:
      raise _Corrupt(f"{what} at byte {self.pos} is {n} bytes long (at most {limit})")
    p = self.take(n, what)
    return self.buf[p : p + n]

  def skip_value(self, vtype: int, key: str, depth: int = 0):
    if vtype in _SCALAR_BYTES:
      self.take(_SCALAR_BYTES[vtype], f"metadata {key}")
    elif vtype == _STRING:
      self.take(self.uint(8, f"metadata {key}"), f"metadata {key}")
    elif vtype == _ARRAY and depth < _MAX_NESTING:
      itype, n = self.uint(4, f"metadata {key}"), self.uint(8, f"metadata {key}")
      self.items += n
      if self.items > MAX_ARRAY_ITEMS:
        raise _Corrupt(f"metadata {key}: arrays hold over {MAX_ARRAY_ITEMS} items in all")
      if itype in _SCALAR_BYTES:
        self.take(n * _SCALAR_BYTES[itype], f"metadata {key} ({n} items)")
      elif itype in (_STRING, _ARRAY):
        if n * (8 if itype == _STRING else 12) > self.left:
          raise _Corrupt(f"metadata {key}: {n} items cannot fit in the {self.left} bytes left")
        for _ in range(n):
          self.skip_value(itype, key, depth + 1)
      else:
        raise _Corrupt(f"metadata {key}: unknown array item type {itype}")
    else:
      raise _Corrupt(f"metadata {key}: unknown or too deeply nested value type {vtype}")


def _walk(buf) -> tuple[list[tuple[str, list[int], int, int]], int]:
  """([(name, dims, byte size, offset in the data section)], where the data section starts)."""
  from gguf.constants import GGML_QUANT_SIZES  # pylint: disable=import-outside-toplevel

  if buf[:4] != b"GGUF":
    raise _Corrupt("no GGUF magic")
  endian = "<"
  (version,) = struct.unpack_from("<I", buf, 4)
  if version & 0xFFFF == 0:  # written on a machine of the other byte order (as GGUFReader reads)
    endian = ">"
    (version,) = struct.unpack_from(">I", buf, 4)
  if version not in (2, 3):
    raise _Corrupt(f"version {version}; supported: 2, 3")
  c = _Cursor(buf, endian, 8)
  n_tensors, n_kv = c.uint(8, "tensor count"), c.uint(8, "metadata count")
  if n_kv > min(MAX_COUNT, c.left // _MIN_KV):
    raise _Corrupt(f"metadata key count {n_kv} is more than the file could hold")
  if n_tensors > min(MAX_COUNT, (c.left - n_kv * _MIN_KV) // _MIN_TENSOR_INFO):
    raise _Corrupt(f"tensor count {n_tensors} is more than the file could describe")
  alignment = 32  # GGUF_DEFAULT_ALIGNMENT
  for _ in range(n_kv):
    key = c.string("metadata key", 65535).decode("utf-8", "replace")
    vtype = c.uint(4, f"metadata {key}")
    if key == "general.alignment":
      alignment = c.uint(4, key) if vtype == _UINT32 else 0
      if alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt("general.alignment must be a uint32 power of two")
    else:
      c.skip_value(vtype, key)
  quant = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
  tensors = []
  for _ in range(n_tensors):
    name = c.string("tensor name", _MAX_NAME).decode("utf-8", "replace")
    n_dims = c.uint(4, f"tensor {name!r}")
    if n_dims > _MAX_DIMS:
      raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
    dims = [c.uint(8, f"tensor {name!r}") for _ in range(n_dims)]
    ttype = c.uint(4, f"tensor {name!r}")
    if ttype not in quant:
      raise _Corrupt(f"tensor {name!r} has unknown type {ttype}")
    offset = c.uint(8, f"tensor {name!r}")
    block, type_size = quant[ttype]
    limit = len(buf) * block  # more elements than this cannot fit, whatever the type
    elements = bounded_product(dims, limit)
    nbytes = elements * type_size // block
    if elements > limit or nbytes > len(buf):
      raise _Corrupt(f"tensor {name!r} of shape {dims} is larger than the file")
    if dims and dims[0] % block:
      raise _Corrupt(f"tensor {name!r} shape {dims} is not whole blocks of {block}")
    tensors.append((name, dims, nbytes, offset))
  return tensors, c.pos + (-c.pos % alignment)


def check_layout(path: str) -> int:
  """Walks a GGUF header and returns the file size, or refuses it with a one-line InputError.

  Counts, string and array lengths, tensor ranks, types, shapes and byte ranges must all fit in
  the file (and in MAX_COUNT / MAX_ARRAY_ITEMS); only key and tensor names are copied.
  """
  size = os.path.getsize(path)
  if size < 24:
    raise InputError(f"{path}: not a valid GGUF file ({size} bytes; the fixed header has 24)")
  try:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
      tensors, start = _walk(buf)
  except _Corrupt as e:
    raise InputError(f"{path}: not a valid GGUF file (truncated or corrupt: {e})") from None
  except OSError as e:
    raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
  spans = []
  for name, _, nbytes, offset in tensors:
    begin = start + offset
    if begin + nbytes > size:
      raise InputError(
        f"{path}: truncated GGUF file (tensor {name!r} ends at byte {begin + nbytes}, "
        f"the file has {size})"
      )
    spans.append((begin, begin + nbytes, name))
  spans.sort()
  for (_, end, prev), (begin, _, name) in zip(spans, spans[1:]):
    if begin < end:
      raise InputError(f"{path}: GGUF tensors {prev!r} and {name!r} overlap (bytes {begin}..{end})")
  return size


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


# Dequantized weights beyond this are damage: SmolLM2-135M's largest is 9.25, and trained weights
# sit orders of magnitude below it. A block of random bytes decodes (through its f16 scale) to a
# non-finite value or one beyond this in 22% (Q4_0) to 34% (Q8_0) of cases, so a few damaged
# blocks are caught almost surely; damage that decodes to plausible values is not.
MAX_ABS = 1e4


def tensors_from_gguf(reader, cfg: ModelConfig, *, where: str) -> dict[str, np.ndarray]:
  """Dequantized tensors under HF names; GPT-2 linears transposed to Conv1D [in, out].

  Each tensor is checked as it is dequantized (`weights_io.check_tensor`: finite, |w| <= MAX_ABS),
  so damaged data in the file `where` is refused in one line naming the GGUF tensor.
  """
  from gguf.quants import dequantize  # pylint: disable=import-outside-toplevel

  gpt2 = cfg.arch == "gpt2"
  top = (
    {"token_embd": "wte", "position_embd": "wpe", "output_norm": "ln_f", "output": "lm_head"}
    if gpt2
    else {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
  )
  out = {}
  for t in reader.tensors:
    with np.errstate(invalid="ignore", over="ignore"):  # damage is reported below, once
      a = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
    check_tensor(a, where, t.name, MAX_ABS)
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
