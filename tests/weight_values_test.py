"""Weights are checked when they load: NaN/Inf in a safetensors or GGUF tensor, and GGUF blocks that
dequantize past any trained weight, are refused in one line naming the file and the tensor."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc

import assets
import cli_util
import ml_dtypes
import numpy as np
import pytest
import tiny_hf

from codi_jax.models import gguf_io, loader, weights_io

TENSOR = "blk.3.attn_q.weight"  # a Q4_1 tensor in the middle of SmolLM2


def _damaged_gguf(tmp_path, data: bytes) -> str:
  """A copy of the SmolLM2 GGUF with `data` written over the start of TENSOR's data."""
  src = assets.smollm2_path()
  (offset,) = [t.data_offset for t in gguf_io.open_reader(src).tensors if t.name == TENSOR]
  path = str(tmp_path / "damaged.gguf")
  shutil.copyfile(src, path)
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)
  return path


def test_gguf_with_0xff_in_tensor_data_is_refused_in_one_line(tmp_path):
  """4 KB of 0xFF decode to NaN scales: generation used to print tokens [0, 0, ...] and exit 0."""
  path = _damaged_gguf(tmp_path, b"\xff" * 4096)
  proc = cli_util.run_module(
    "soft_jax.generate", tmp_path, f"--model={path}", "--prompt=hi", "--max_new_tokens=4"
  )
  cli_util.assert_usage_error(proc, "soft_jax.generate", path, repr(TENSOR), "NaN")


def test_gguf_with_random_bytes_in_tensor_data_is_refused(tmp_path):
  """4 KB of random bytes: some of the ~200 damaged Q4_1 blocks decode to NaN (their f16 scale)."""
  data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
  path = _damaged_gguf(tmp_path, data)
  cli_util.raises_one_line(lambda: loader.load(path), path, repr(TENSOR), "holds")


def test_gguf_block_with_a_huge_finite_scale_is_refused(tmp_path):
  """Finite damage: one Q4_1 block's scale d (its first 2 bytes) = 30000 puts its weights near
  30000 * 15, beyond gguf_io.MAX_ABS, where no trained weight is."""
  path = _damaged_gguf(tmp_path, np.float16(30000).tobytes())
  cli_util.raises_one_line(
    lambda: loader.load(path), path, repr(TENSOR), "values up to", f"beyond {gguf_io.MAX_ABS:g}"
  )


def test_real_gguf_passes_the_check():
  path = assets.smollm2_path()
  reader = gguf_io.open_reader(path)
  cfg = gguf_io.config_from_gguf(reader, path)
  tensors = gguf_io.tensors_from_gguf(reader, cfg, where=path)
  assert max(float(np.abs(a).max()) for a in tensors.values()) < gguf_io.MAX_ABS / 100


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_safetensors_with_nan_or_inf_is_refused(tmp_path, bad, dtype):
  path = tiny_hf.write(str(tmp_path / "m"))
  file = os.path.join(path, "model.safetensors")
  tensors = {k: np.array(v, dtype) for k, v in weights_io.read_safetensors(file).items()}
  name = "model.layers.1.mlp.up_proj.weight"
  tensors[name][3, 5] = bad
  weights_io.write_safetensors(file, tensors)
  what = "NaN" if np.isnan(bad) else "infinite"
  cli_util.raises_one_line(lambda: loader.load(path), file, repr(name), what)


def test_sharded_safetensors_names_the_shard(tmp_path):
  path = tiny_hf.write(str(tmp_path / "m"))
  single = os.path.join(path, "model.safetensors")
  tensors = dict(weights_io.read_safetensors(single))
  name = "model.layers.0.self_attn.k_proj.weight"
  keys = sorted(tensors)
  shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
  owner = next(s for s, ks in shards.items() if name in ks)
  for shard, ks in shards.items():
    part = {k: np.array(tensors[k]) for k in ks}
    if shard == owner:
      part[name][0, 0] = np.nan
    weights_io.write_safetensors(os.path.join(path, shard), part)
  os.remove(single)
  weight_map = {k: s for s, ks in shards.items() for k in ks}
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": weight_map}, f)
  cli_util.raises_one_line(lambda: loader.load(path), os.path.join(path, owner), repr(name))


def test_check_makes_no_copy_of_a_memory_mapped_tensor(tmp_path):
  """Two reductions over the mapped file: the Python heap peak stays far below the tensor's size."""
  file = str(tmp_path / "big.safetensors")
  weights_io.write_safetensors(file, {"w": np.ones((4096, 4096), np.float32)})  # 64 MiB
  (w,) = weights_io.read_safetensors(file).values()
  tracemalloc.start()
  try:
    weights_io.check_tensor(w, file, "w", max_abs=2.0)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 2**20, peak
  with pytest.raises(Exception, match="beyond 0.5"):
    weights_io.check_tensor(w, file, "w", max_abs=0.5)
