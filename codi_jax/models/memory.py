"""Memory estimates before allocation: refuse a run that cannot fit instead of dying in it.

    need = memory.decode_bytes(cfg, batch, capacity, prompt_len=bucket)
    memory.check_fits(need, memory.available_bytes(), f"decoding batch {batch}, capacity {capacity}")

`decode_bytes` counts the KV cache exactly (what `cache.init_cache` allocates) plus the peak
working set of one layer during the prefill and during a decode step, as `Transformer.__call__`
computes them: f32 attention scores and probabilities [B, H, L, T], q/k/v, the MLP, and f32
logits at the last position only (prefill uses logits="last"). The working set is an upper bound
(XLA reuses buffers), within a small factor of what XLA reports for the compiled prefill and loop.
Parameters are separate (`param_bytes`).

The decoders call `check_decode` before allocating anything for a call: length-aware decoding
(`cache.capacities`) may reach its last bucket, so that is what is checked (`length_aware_bytes`),
per device under the model's mesh. Training calls `check_compiled` on its compiled step. The CLIs
call `check_positions` once the model's config is known.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import math
import os
from typing import NamedTuple

import jax
import numpy as np

from codi_jax.errors import InputError
from codi_jax.models.config import ModelConfig

GiB = 1 << 30
# f32 logits buffers live at once in a decode step: logits, probabilities, a sorted copy (top-k,
# top-p) in sampling and soft thinking.
_LOGITS_BUFFERS = 3


class DecodeEstimate(NamedTuple):
  """Bytes of a decode run: the cache plus the larger of the two working sets."""

  kv_cache: int
  prefill: int  # working set of the prompt's forward pass (one layer at a time), cache excluded
  step: int  # working set of one decode step, cache excluded

  @property
  def total(self) -> int:
    return self.kv_cache + max(self.prefill, self.step)


def kv_cache_bytes(cfg: ModelConfig, batch: int, capacity: int, *, dtype=None) -> int:
  """Exactly what `cache.init_cache(cfg, batch, capacity, dtype)` allocates: k and v per layer
  (2 * layers * batch * capacity * kv_heads * head_dim * itemsize), the valid mask and `end`."""
  item = np.dtype(dtype or cfg.dtype).itemsize
  kv = 2 * cfg.num_layers * batch * capacity * cfg.num_kv_heads * cfg.head_dim * item
  return kv + batch * capacity + 4  # valid [B, T] bool, end [] int32


def _forward_bytes(cfg: ModelConfig, B: int, L: int, T: int, logits_buffers: int) -> int:
  """Peak working set of a forward of L inputs against T cache slots, one layer live at a time."""
  act = np.dtype(cfg.dtype).itemsize
  H, K, Dh, D, F, V = (
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.d_model,
    cfg.d_ff,
    cfg.vocab_size,
  )
  residual = 3 * B * L * D * act  # stream, normed input, block output
  qkv = 2 * B * L * (H + 2 * K) * Dh * act  # projections and their head-major copies
  scores = 2 * B * H * L * T * 4  # f32 scores and softmax probabilities
  attention = qkv + scores + B * H * L * T * act + B * L * H * Dh * act  # + probs cast, output
  if L > 1:  # prefill: head-major copies of this layer's whole k and v cache for batched matmuls
    attention += 2 * B * T * K * Dh * act
  mlp = (2 if cfg.arch == "gpt2" else 3) * B * L * F * act  # gate, up and their product
  mask = B * L * T  # allowed [B, L, T] bool
  rope = 0 if cfg.arch == "gpt2" else 2 * B * L * Dh * act
  return residual + max(attention, mlp) + mask + rope + logits_buffers * B * V * 4


def decode_estimate(
  cfg: ModelConfig, batch: int, capacity: int, *, dtype=None, prompt_len: int | None = None
) -> DecodeEstimate:
  """Cache and working sets of prefilling `prompt_len` tokens (default: the whole capacity) and
  decoding up to `capacity` slots in total."""
  L = capacity if prompt_len is None else min(prompt_len, capacity)
  return DecodeEstimate(
    kv_cache=kv_cache_bytes(cfg, batch, capacity, dtype=dtype),
    prefill=_forward_bytes(cfg, batch, L, capacity, 1),
    step=_forward_bytes(cfg, batch, 1, capacity, _LOGITS_BUFFERS),
  )


def decode_bytes(
  cfg: ModelConfig, batch: int, capacity: int, *, dtype=None, prompt_len: int | None = None
) -> int:
  """Peak bytes of decoding with a `capacity`-slot cache (parameters excluded); dtype: the cache's
  (default cfg.dtype, as init_cache)."""
  return decode_estimate(cfg, batch, capacity, dtype=dtype, prompt_len=prompt_len).total


def param_bytes(state, *, per_device: bool = False) -> int:
  """Bytes of every array in a pytree (nnx.State, params dict, ShapeDtypeStructs); per_device: of
  one device's shard under each leaf's sharding (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(state):
    leaf = getattr(leaf, "value", leaf)  # an nnx Variable left as a leaf
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
      continue
    sharding = getattr(leaf, "sharding", None) if per_device else None
    if sharding is not None:
      shape = sharding.shard_shape(tuple(shape))
    total += math.prod(shape) * np.dtype(dtype).itemsize
  return total


def available_bytes(device=None) -> int:
  """Free memory for new arrays on `device` (default: the first): the allocator's bytes_limit minus
  bytes_in_use where the backend reports them (GPU, TPU), else the host's MemAvailable, capped by
  the cgroup (container) limit."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (unimplemented on some backends)
    stats = None
  if stats and "bytes_limit" in stats:
    return max(0, int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
  return host_available_bytes()


def host_available_bytes(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int:
  """MemAvailable from /proc/meminfo, capped by the cgroup v2 or v1 memory limit minus usage."""
  avail = None
  try:
    with open(meminfo) as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          avail = int(line.split()[1]) * 1024
          break
  except (OSError, ValueError, IndexError):
    pass
  if avail is None:  # not Linux: physical memory as a last resort
    try:
      avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      avail = 0
  for limit_file, usage_file in (
    ("memory.max", "memory.current"),  # v2
    ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),  # v1
  ):
    limit, usage = _read_int(f"{cgroup}/{limit_file}"), _read_int(f"{cgroup}/{usage_file}")
    if limit is not None and limit < (1 << 60):  # "max" or v1's huge "unlimited"
      avail = min(avail, max(0, limit - (usage or 0)))
      break
  return avail


def _read_int(path: str) -> int | None:
  try:
    with open(path) as f:
      return int(f.read().strip())
  except (OSError, ValueError):
    return None


def gib(n: int) -> str:
  """Bytes for people: '4,291.51 GiB', or MiB below 0.01 GiB."""
  return f"{n / GiB:,.2f} GiB" if n >= GiB // 100 else f"{n / (1 << 20):,.2f} MiB"


def check_fits(needed: int, available: int, what: str) -> None:
  """InputError (one line: the estimate and the available memory) if `needed` > `available`."""
  if needed > available:
    raise InputError(
      f"{what}: needs about {gib(needed)} (estimate, {needed} bytes) but only {gib(available)} "
      "is available; lower the batch size or the sequence length"
    )


def length_aware_bytes(
  cfg: ModelConfig, batch: int, capacities, *, prompt_len: int, dtype=None
) -> int:
  """Peak bytes of a decode run through `capacities` (`cache.capacities`, smallest first): the
  last cache and the one it grows from (both live during the growth), plus the larger of the
  prefill's working set in the first bucket and a step's in the last. One bucket: `decode_bytes`."""
  caps = tuple(capacities)
  first, last = caps[0], caps[-1]
  kv = kv_cache_bytes(cfg, batch, last, dtype=dtype)
  if len(caps) > 1:
    kv += kv_cache_bytes(cfg, batch, caps[-2], dtype=dtype)
  prefill = _forward_bytes(cfg, batch, min(prompt_len, first), first, 1)
  return kv + max(prefill, _forward_bytes(cfg, batch, 1, last, _LOGITS_BUFFERS))


def per_device(cfg: ModelConfig, batch: int, mesh=None, rules=None) -> tuple[ModelConfig, int]:
  """(config, batch) of one device's share: the batch split over the mesh axes of the `batch`
  rule and the kv heads over those of `act_kv`, where they divide (as the cache is sharded)."""
  if mesh is None:
    return cfg, batch
  rules = rules or {}
  b = math.prod(mesh.shape[a] for a in rules.get("batch", ()))
  t = math.prod(mesh.shape[a] for a in rules.get("act_kv", ()))
  if b > 1 and batch % b == 0:
    batch //= b
  if t > 1 and cfg.num_kv_heads % t == 0 and cfg.num_heads % t == 0:
    cfg = cfg.replace(num_kv_heads=cfg.num_kv_heads // t, num_heads=cfg.num_heads // t)
  return cfg, batch


def check_decode(
  cfg: ModelConfig,
  batch: int,
  capacities,
  *,
  prompt_len: int,
  new_tokens: int,
  out_bytes_per_token: int = 4,
  mesh=None,
  rules=None,
  available: int | None = None,
  what: str = "decoding",
) -> int:
  """Refuses (one-line InputError with the estimate and the free memory) a decode call whose
  worst case cannot fit; returns the estimate. Nothing is allocated: call it before the call.

  Counts `length_aware_bytes` for one device's share plus the call's [batch, new_tokens] output
  buffers (`out_bytes_per_token` bytes per row and token: 4 for int32 tokens).
  """
  if cfg is None:  # a model whose config is not known: nothing to estimate from
    return 0
  caps = tuple(capacities)
  dev_cfg, dev_batch = per_device(cfg, batch, mesh, rules)
  need = length_aware_bytes(dev_cfg, dev_batch, caps, prompt_len=prompt_len)
  need += batch * new_tokens * out_bytes_per_token
  free = available_bytes() if available is None else available
  rows = "row" if batch == 1 else "rows"
  check_fits(
    need,
    free,
    f"{what}: {batch} {rows} x {caps[-1]} cache slots (prompt {prompt_len} + {new_tokens} new "
    f"tokens, {cfg.num_layers} layers x {cfg.num_kv_heads} kv heads x {cfg.head_dim})",
  )
  return need


def check_positions(
  cfg: ModelConfig,
  prompt_len: int,
  new_tokens: int,
  *,
  allow_extrapolation: bool = False,
  what: str = "--max_new_tokens",
  prompt: str = "",
  fix: str = "shorten the prompt",
) -> None:
  """InputError unless the longest prompt plus the new tokens fit the model's positions. RoPE
  models may go past them when the user allows it; GPT-2's learned table never.

  A prompt that alone fills the positions is blamed on itself, not on `what`: `prompt` says what
  its positions hold (default "a <n>-token prompt") and `fix` what to change."""
  need = prompt_len + new_tokens
  if need <= cfg.max_positions:
    return
  learned = cfg.arch == "gpt2"
  extrapolate = (
    ""
    if learned
    else ", or pass --allow_extrapolation (RoPE positions past the context: quality degrades)"
  )
  if prompt_len >= cfg.max_positions and (learned or not allow_extrapolation):
    has = "learned positions" if learned else "positions of context"
    raise InputError(
      f"{prompt or f'a {prompt_len:,}-token prompt'} uses {prompt_len:,} positions; the model "
      f"({cfg.arch}) has {cfg.max_positions:,} {has}, none left for the {new_tokens:,} new "
      f"tokens of {what}; {fix}{extrapolate}"
    )
  head = (
    f"{what}: got {new_tokens}; {prompt or f'a {prompt_len}-token prompt'} + {new_tokens} new "
    f"tokens need {need:,} positions"
  )
  if cfg.arch == "gpt2":
    raise InputError(
      f"{head}, and the model ({cfg.arch}) has {cfg.max_positions:,} learned positions; expected "
      f"<= {max(cfg.max_positions - prompt_len, 0)}"
    )
  if not allow_extrapolation:
    raise InputError(
      f"{head}, past the model's context of {cfg.max_positions:,}; expected "
      f"<= {max(cfg.max_positions - prompt_len, 0)}, or pass --allow_extrapolation (RoPE "
      "positions past the context: quality degrades)"
    )


def check_compiled(compiled, what: str, *, margin: float = 1.1, available: int | None = None):
  """Refuses a compiled program whose per-device memory (XLA's `memory_analysis`: temporaries
  and outputs not aliased to its arguments, which are already allocated) exceeds `margin` x the
  free memory; returns `compiled`. Backends without an analysis pass."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    m = None
  if m is None:
    return compiled
  need = (
    int(m.temp_size_in_bytes)
    + max(0, int(m.output_size_in_bytes) - int(m.alias_size_in_bytes))
    + int(getattr(m, "generated_code_size_in_bytes", 0) or 0)
  )
  free = available_bytes() if available is None else available
  if need > margin * free:
    raise InputError(
      f"{what}: needs about {gib(need)} per device beyond its arguments (XLA's compiled memory "
      f"analysis: temporaries {gib(int(m.temp_size_in_bytes))}) but only {gib(free)} is "
      f"available (refused above {margin:g}x); lower --config.data.batch_size (raise "
      "--config.optim.grad_accum to keep the update size), set --config.codi.remat_teacher=True "
      "and --config.codi.remat_thoughts=True "
      "or shard over more devices (--config.mesh.fsdp)"
    )
  return compiled
