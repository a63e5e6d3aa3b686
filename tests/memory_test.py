"""Memory estimates: the KV cache exactly as allocated, working sets bounding what XLA compiles,
and a one-line refusal when a run cannot fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codi_jax import decoding
from codi_jax.errors import InputError
from codi_jax.models import cache as kvc
from codi_jax.models import config, hf, memory, transformer

SMOLLM2_135M = config.ModelConfig(
  arch="llama",
  vocab_size=49152,
  num_layers=30,
  d_model=576,
  num_heads=9,
  num_kv_heads=3,
  head_dim=64,
  d_ff=1536,
  max_positions=8192,
)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
@pytest.mark.parametrize("batch,capacity", [(1, 7), (3, 64)])
def test_kv_cache_estimate_is_exact(arch, dtype, batch, capacity):
  cfg = config.tiny(arch)
  cache = kvc.init_cache(cfg, batch, capacity, dtype)
  allocated = sum(x.nbytes for x in jax.tree.leaves(cache))
  assert memory.kv_cache_bytes(cfg, batch, capacity, dtype=dtype) == allocated
  est = memory.decode_estimate(cfg, batch, capacity, dtype=dtype)
  assert est.kv_cache == allocated and est.total == memory.decode_bytes(
    cfg, batch, capacity, dtype=dtype
  )


def test_smollm2_kv_cache_formula():
  est = memory.kv_cache_bytes(SMOLLM2_135M, 1, 100_000_000)
  assert est == 2 * 30 * 1 * 100_000_000 * 3 * 64 * 4 + 100_000_000 + 4


@pytest.mark.parametrize(
  "arch,batch,prompt,capacity",
  [("llama", 4, 128, 256), ("llama", 2, 16, 1024), ("gpt2", 16, 8, 64), ("gpt2", 2, 64, 128)],
)
def test_estimate_bounds_what_xla_allocates(arch, batch, prompt, capacity):
  """Prefill plus the greedy loop, compiled: temporaries and outputs (the cache among them) stay
  under the estimate, and the estimate is within 2x of them."""
  cfg = config.tiny(arch, vocab_size=512, d_model=64, d_ff=256, head_dim=16, max_positions=4096)
  graphdef, state = nnx.split(transformer.build(cfg))

  def generate(state, ids, mask):
    model = nnx.merge(graphdef, state)
    logits, cache, pos = decoding.prefill(model, ids, mask, capacity)
    return decoding.greedy_loop(model, logits, cache, pos, capacity - prompt, jnp.array([0]), 0)

  ids = jnp.ones((batch, prompt), jnp.int32)
  analysis = (
    jax.jit(generate).lower(state, ids, jnp.ones_like(ids, bool)).compile().memory_analysis()
  )
  if analysis is None:
    pytest.skip("this backend reports no memory analysis")
  xla = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
  est = memory.decode_bytes(cfg, batch, capacity, prompt_len=prompt)
  assert xla <= est <= 2 * xla, (xla, est)


def test_refuses_a_cache_that_cannot_fit():
  need = memory.decode_bytes(SMOLLM2_135M, 1, 100_000_000, prompt_len=100)
  assert need > memory.kv_cache_bytes(SMOLLM2_135M, 1, 100_000_000) > 4000 * memory.GiB
  with pytest.raises(InputError) as info:
    memory.check_fits(
      need, memory.available_bytes(), "decoding with batch 1 and capacity 100000000"
    )
  msg = str(info.value)
  assert "\n" not in msg
  assert msg.startswith(
    f"decoding with batch 1 and capacity 100000000: needs about {memory.gib(need)}"
  )
  assert f"{need} bytes" in msg and "GiB" in msg and "available" in msg


def test_check_fits_passes_what_fits():
  memory.check_fits(10, 10, "x")
  with pytest.raises(InputError, match=r"x: needs about 2.00 GiB .* only 1.00 GiB is available"):
    memory.check_fits(2 * memory.GiB, memory.GiB, "x")
  assert memory.gib(3 << 20) == "3.00 MiB"


def test_param_bytes():
  model = transformer.build(config.tiny("qwen2"))
  state = nnx.state(model)
  expected = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
  assert memory.param_bytes(state) == expected
  assert memory.param_bytes(nnx.state(hf.abstract_model(config.tiny("qwen2")))) == expected
  assert memory.param_bytes(state, per_device=True) == expected  # one device: whole arrays
  bf16 = {"w": jax.ShapeDtypeStruct((3, 5), jnp.bfloat16), "n": None, "s": "not an array"}
  assert memory.param_bytes(bf16) == 30


class _Device:
  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    if isinstance(self.stats, Exception):
      raise self.stats
    return self.stats


def test_available_bytes_of_an_accelerator():
  gpu = _Device({"bytes_limit": 80 * memory.GiB, "bytes_in_use": 30 * memory.GiB})
  assert memory.available_bytes(gpu) == 50 * memory.GiB


@pytest.mark.parametrize("stats", [None, {}, NotImplementedError("cpu")])
def test_available_bytes_of_the_host(stats):
  host = memory.host_available_bytes()
  got = memory.available_bytes(_Device(stats))
  assert 0 < got and abs(got - host) < host // 10  # other processes come and go
  assert 0 < memory.available_bytes() < 1 << 50  # the CPU device of the tests


def test_host_available_bytes_cgroup_limits(tmp_path):
  meminfo = tmp_path / "meminfo"
  meminfo.write_text("MemTotal:  16000000 kB\nMemAvailable:  8000000 kB\n")
  v2, v1, none = tmp_path / "v2", tmp_path / "v1" / "memory", tmp_path / "none"
  for d in (v2, v1, none):
    d.mkdir(parents=True)
  (v2 / "memory.max").write_text(f"{4 << 30}\n")
  (v2 / "memory.current").write_text(f"{1 << 30}\n")
  (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1 "unlimited"
  (v1 / "memory.usage_in_bytes").write_text("123\n")
  assert memory.host_available_bytes(str(meminfo), str(none)) == 8_000_000 * 1024
  assert memory.host_available_bytes(str(meminfo), str(v2)) == 3 << 30
  assert memory.host_available_bytes(str(meminfo), str(tmp_path / "v1")) == 8_000_000 * 1024
  (v2 / "memory.max").write_text("max\n")
  assert memory.host_available_bytes(str(meminfo), str(v2)) == 8_000_000 * 1024
