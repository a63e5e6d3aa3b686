"""Checkpoint tensor files: safetensors read and written without torch (bf16 through ml_dtypes),
sharded HF directories, and a torch `.bin` only through `torch.load(weights_only=True)` when torch
is installed. Files from strangers stay bounded: every header is checked before a large allocation.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from codi_jax.errors import InputError

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


# A header is JSON naming each tensor's dtype, shape and byte range; the reference implementation
# refuses headers over 100 MB too, so a longer declared length is damage, not a model.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_MAX_DIMS = 32  # numpy's portable rank limit; real checkpoints use at most 5


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def bounded_product(shape: list[int], limit: int) -> int:
  """The product of `shape`, or limit + 1 as soon as it exceeds `limit` (no huge intermediates)."""
  if 0 in shape:
    return 0
  n = 1
  for d in shape:
    n *= d
    if n > limit:
      return limit + 1
  return n


_CHECK_CHUNK = 1 << 20  # elements per step of `check_tensor`: bounds its temporaries at 4 MiB


def check_tensor(a: np.ndarray, where: str, name: str, max_abs: float | None = None):
  """Refuses a floating tensor holding NaN or Inf (or, if `max_abs` is given, a value beyond it)
  with one InputError naming the file and the tensor: a damaged file fails at load, not as
  garbage output. Min and max (NaN propagates, Inf is an extreme) over chunks: f16/bf16 are
  widened to f32 a chunk at a time (numpy reduces them natively 3-5x slower), f32 is reduced in
  place, so a memory-mapped tensor is read once or twice and never copied whole."""
  if a.size == 0 or not (a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16):
    return
  wide = a.dtype if a.dtype.itemsize >= 4 else np.float32
  flat, lo, hi = a.reshape(-1), np.inf, -np.inf
  for i in range(0, flat.size, _CHECK_CHUNK):
    chunk = np.asarray(flat[i : i + _CHECK_CHUNK], wide)
    lo, hi = np.minimum(lo, chunk.min()), np.maximum(hi, chunk.max())
  lo, hi = float(lo), float(hi)
  if np.isnan(lo) or np.isnan(hi):
    bad = "NaN values"
  elif np.isinf(lo) or np.isinf(hi):
    bad = "infinite values"
  elif max_abs is not None and max(-lo, hi) > max_abs:
    bad = f"values up to {max(-lo, hi):.3g} (beyond {max_abs:g}, far past any trained weight)"
  else:
    return
  raise InputError(
    f"{where}: tensor {name!r} holds {bad}; the file is damaged (or was saved from a run that "
    "diverged): fetch or write it again"
  )


def _safetensors_header(path: str) -> tuple[dict, int]:
  """(parsed header, byte offset of the data): the 8-byte length is checked before reading on."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise InputError(f"{path}: not a safetensors file ({size} bytes, no 8-byte header length)")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8 or n > MAX_HEADER_BYTES:
        raise InputError(
          f"{path}: not a safetensors file (header length {n} exceeds the file of {size} bytes "
          f"or the {MAX_HEADER_BYTES >> 20} MiB limit)"
        )
      raw = f.read(n)
  except OSError as e:
    raise InputError(f"{path}: not a readable safetensors file ({e.strerror or e})") from None
  try:
    header = json.loads(raw)
  except (ValueError, RecursionError) as e:
    first = (str(e).splitlines() or [""])[0][:100]
    raise InputError(f"{path}: not a safetensors file (header is not JSON: {first})") from None
  if not isinstance(header, dict):
    raise InputError(f"{path}: malformed safetensors header (not a JSON object)")
  return header, 8 + n


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Memory-maps a .safetensors file into numpy arrays (bf16 via ml_dtypes), no torch needed.

  Every header entry is validated against the file (dtype, shape, byte range, no overlap) before
  anything is mapped, so a damaged or hostile file costs at most its header to refuse.
  """
  header, start = _safetensors_header(path)
  data_size = os.path.getsize(path) - start
  entries = []
  for k, meta in header.items():
    if k == "__metadata__":
      continue
    if not isinstance(meta, dict):
      raise InputError(f"{path}: malformed header entry for tensor {k!r} (not a JSON object)")
    name, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if name not in _ST_DTYPES:
      raise InputError(
        f"{path}: tensor {k!r} has dtype {name!r}; supported: {', '.join(_ST_DTYPES)}"
      )
    if (
      not isinstance(shape, list)
      or len(shape) > _MAX_DIMS
      or not all(_is_int(d) and d >= 0 for d in shape)
    ):
      raise InputError(
        f"{path}: tensor {k!r} has shape {str(shape)[:100]}; expected a list of at most "
        f"{_MAX_DIMS} non-negative integers"
      )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
      raise InputError(
        f"{path}: tensor {k!r} has data_offsets {str(offsets)[:100]}; expected [begin, end]"
      )
    dtype = np.dtype(_ST_DTYPES[name])
    a, b = offsets
    nbytes = bounded_product(shape, data_size // dtype.itemsize) * dtype.itemsize
    if nbytes > data_size:
      raise InputError(
        f"{path}: tensor {k!r} of shape {shape} {name} is larger than the file "
        f"({data_size} data bytes)"
      )
    if not 0 <= a <= b or b - a != nbytes:
      raise InputError(f"{path}: tensor {k!r} offsets {a}..{b} do not match shape {shape} {name}")
    if b > data_size:
      raise InputError(f"{path}: truncated (tensor {k!r} ends at byte {b}, file has {data_size})")
    entries.append((a, b, k, dtype, shape))
  spans = sorted(entries, key=lambda e: (e[0], e[1]))
  for (_, end, prev, *_), (a, _, k, *_) in zip(spans, spans[1:]):
    if a < end:
      raise InputError(f"{path}: tensors {prev!r} and {k!r} overlap (bytes {a}..{end})")
  try:
    data = np.memmap(path, np.uint8, mode="r", offset=start) if data_size else np.zeros(0, np.uint8)
  except (OSError, ValueError) as e:
    raise InputError(f"{path}: not a readable safetensors file ({e})") from None
  return {k: data[a:b].view(dtype).reshape(shape) for a, b, k, dtype, shape in entries}


def write_safetensors(path: str, tensors: dict[str, np.ndarray]):
  """Writes numpy arrays as .safetensors (for tests and exports)."""
  inv = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
  header, off, blobs = {}, 0, []
  for k, v in tensors.items():
    v = np.asarray(v, order="C")
    header[k] = {
      "dtype": inv[v.dtype],
      "shape": list(v.shape),
      "data_offsets": [off, off + v.nbytes],
    }
    off += v.nbytes
    blobs.append(v.tobytes())
  h = json.dumps(header).encode()
  h += b" " * (-len(h) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for b in blobs:
      f.write(b)


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
  """A pytorch_model.bin through torch.load(weights_only=True); torch is optional."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise InputError(
      f"{path}: reading a PyTorch .bin needs torch (pip install torch); "
      "safetensors checkpoints need nothing extra"
    ) from None
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [""])[0]
    raise InputError(
      f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {first})"
    ) from None
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}


def _shard_names(idx: str) -> list[str]:
  """The shard files an index names: bounded in size, and plain names inside its directory."""
  try:
    if os.path.getsize(idx) > MAX_HEADER_BYTES:
      raise InputError(f"{idx}: malformed index (larger than {MAX_HEADER_BYTES >> 20} MiB)")
    with open(idx, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
    raise InputError(f"{idx}: malformed index ({type(e).__name__}: {e})") from None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise InputError(f"{idx}: malformed index (weight_map must map tensor names to file names)")
  names = sorted(set(weight_map.values()))
  for name in names:
    if name in ("", ".", "..") or os.path.basename(name) != name:
      raise InputError(
        f"{idx}: weight_map names {name!r}; shards must be files in the model directory"
      )
  return names


def read_hf_weights(directory: str) -> dict[str, np.ndarray]:
  """All tensors of an HF model directory: sharded or single safetensors, else pytorch_model.bin."""
  idx = os.path.join(directory, "model.safetensors.index.json")
  single = os.path.join(directory, "model.safetensors")
  if os.path.exists(idx):
    out, shard_of = {}, {}
    for name in _shard_names(idx):
      for k, v in read_safetensors(os.path.join(directory, name)).items():
        if k in shard_of:
          raise InputError(f"{idx}: tensor {k!r} is in both {shard_of[k]} and {name}")
        shard_of[k], out[k] = name, v
    return out
  if os.path.exists(single):
    return read_safetensors(single)
  for name in ("pytorch_model.bin",):
    if os.path.exists(os.path.join(directory, name)):
      return read_torch_bin(os.path.join(directory, name))
  raise InputError(
    f"{directory}: no weights (expected model.safetensors, model.safetensors.index.json "
    "or pytorch_model.bin)"
  )
