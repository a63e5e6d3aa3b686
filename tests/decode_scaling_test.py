"""Length-aware decoding (codi_jax.decoding): the KV cache grows in capacity buckets between jitted
loop segments. The tokens equal the fixed-capacity path's (greedy, every soft mode with their RNG
streams, CODI student/teacher), one compile per bucket reached, the cache keeps its sharding."""
# pylint: disable=invalid-name

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codi_jax.codi.decoder import CodiDecoder
from codi_jax.codi.model import Codi, CodiOptions
from codi_jax.data.codi_batches import SpecialIds
from codi_jax.decoding import Generator, prefill
from codi_jax.models import cache as kvc
from codi_jax.models import config as mcfg
from codi_jax.models import transformer
from soft_jax.decode import SoftDecoder
from soft_jax.sampling import SamplerParams

V = 64
PAD, EOS = 0, V + 1  # EOS is never emitted: every row runs to its budget
PROMPTS = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13]]
N = 40  # budget: prompt bucket 8 + 40 = 48 slots on the fixed path
MIN = 8  # length-aware buckets 16, 32, 48: two growths
BUCKETS = (16, 32, 48)


@pytest.fixture(scope="module")
def model():
  return transformer.build(mcfg.tiny("llama", vocab_size=V, num_layers=1), seed=0)


def test_capacity_buckets_double_from_the_minimum_up_to_the_fixed_capacity():
  assert kvc.capacities(8, 48, MIN, chunk=8) == BUCKETS
  assert kvc.capacities(8, 48, MIN) == BUCKETS  # 8 filled: the first bucket leaves room to step
  assert kvc.capacities(8, 48, None) == kvc.capacities(8, 48, 0) == (48,)  # the fixed path
  assert kvc.capacities(10, 20, 256) == (20,)  # a budget under the minimum: one bucket
  # A 32k reasoning budget: doublings from 256, the last one straight to the fixed capacity
  # (doubling 16384 would leave 100 slots for one more program).
  caps = kvc.capacities(100, 100 + 32768, 256)
  assert caps == (256, 512, 1024, 2048, 4096, 8192, 16384, 32868)
  for used, total, low in [(100, 32868, 256), (5, 1000, 16), (300, 301, 64), (1, 4097, 1)]:
    caps = kvc.capacities(used, total, low)
    assert caps[-1] == total and list(caps) == sorted(set(caps))
    assert len(caps) <= 1 + math.ceil(math.log2(total / low))
    assert all(b <= max(2 * a, total) for a, b in zip(caps, caps[1:]))


def test_grow_appends_empty_slots_and_decodes_as_before(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask):
    m = nnx.merge(graphdef, state)
    _, cache, pos = prefill(m, ids, mask, 6)
    big = kvc.grow(cache, 16)
    x = m.embed_tokens(jnp.asarray([[11], [12]]))
    small_out = m(embeds=x, positions=pos[:, None], cache=cache, logits="last")
    big_out = m(embeds=x, positions=pos[:, None], cache=big, logits="last")
    return cache, big, small_out.logits, big_out.logits, big_out.cache

  ids = jnp.asarray([[0, 3, 4, 5], [6, 7, 8, 9]], jnp.int32)
  cache, big, small_logits, big_logits, stepped = run(state, ids, ids > 0)
  assert big.capacity == 16 and int(big.end) == 4 and kvc.grow(cache, 6) is cache
  np.testing.assert_array_equal(np.asarray(big.valid[:, :6]), np.asarray(cache.valid))
  assert not np.asarray(big.valid[:, 6:]).any()
  for a, b in zip((cache.k, cache.v), (big.k, big.v)):  # [layers, B, T, K, Dh]
    np.testing.assert_array_equal(np.asarray(b[:, :, :6]), np.asarray(a))
    assert not np.asarray(b[:, :, 6:]).any()
  np.testing.assert_allclose(small_logits, big_logits, rtol=0, atol=1e-6)
  assert int(stepped.end) == 5 and stepped.capacity == 16
  with pytest.raises(ValueError, match="only grows"):
    kvc.grow(big, 8)


def test_greedy_equals_fixed_path_with_one_compile_per_bucket_reached(model):
  gen = Generator(model, PAD, [EOS], min_capacity=MIN)
  grown = gen(PROMPTS, N, length_bucket=8)
  assert gen.last_capacity == 48 and gen.compiles == 3  # start at 16, resume at 32 and 48
  assert gen.model.compiles_of("_greedy") == 1 and gen.model.compiles_of("_greedy_resume") == 2
  gen([[20, 21], [22], [23, 24, 25]], N, length_bucket=8)  # same shapes: nothing new
  assert gen.compiles == 3 and not gen.model.retraced()
  gen.min_capacity = None  # the fixed-capacity path: one program over 48 slots
  fixed = gen(PROMPTS, N, length_bucket=8)
  assert gen.last_capacity == 48 and gen.compiles == 4
  assert grown == fixed and all(len(t) == N for t in fixed)
  # Rows that all stop early never reach the larger buckets, nor compile them (3 stop ids: one
  # more start program).
  gen.min_capacity = MIN
  gen.eos = jnp.asarray(sorted({t[1] for t in fixed}), jnp.int32)
  short = gen(PROMPTS, N, length_bucket=8)
  assert all(len(s) <= 2 and s == f[: len(s)] for s, f in zip(short, fixed))
  assert gen.last_capacity == 16 and gen.model.compiles_of("_greedy_resume") == 2


SOFT = SamplerParams(
  max_topk=4, top_k=30, temperature=1.0, after_temperature=1.0, cold_stop_entropy=0.0
)


@pytest.mark.parametrize("mode", ["sample", "soft", "dirichlet", "gumbel"])
def test_soft_modes_equal_fixed_path_with_the_same_draws(model, mode):
  dec = SoftDecoder(model, SOFT.replace(mode=mode), pad_id=PAD, eos_ids=[EOS], min_capacity=MIN)
  run = lambda: dec(PROMPTS, max_new_tokens=N, length_bucket=8, seed=3, record=True)  # noqa: E731
  grown = run()
  assert dec.last_capacity == 48 and dec.compiles == 3
  dec.min_capacity = None
  fixed = run()
  assert dec.compiles == 4
  for g, f in zip(grown, fixed):
    assert g.tokens == f.tokens and len(f.tokens) == N
    assert (g.thinking_tokens, g.stop_reason) == (f.thinking_tokens, f.stop_reason)
    np.testing.assert_array_equal(g.records["idx"], f.records["idx"])
    np.testing.assert_allclose(g.records["w"], f.records["w"], rtol=0, atol=1e-5)
  # Not vacuous: the draws vary (soft emits each step's top-1) and the concept tokens mix.
  if mode != "soft":
    assert len({t for r in fixed for t in r.tokens}) > 10
  if mode != "sample":
    assert any(np.any(r.records["w"][:, 1] > 0.05) for r in fixed)


SPECIAL = SpecialIds(pad=V - 3, bot=V - 2, eot=V - 1, eos=EOS)


def test_codi_student_and_teacher_equal_fixed_path():
  backbone = transformer.build(mcfg.tiny("gpt2", vocab_size=V, num_layers=1), seed=2)
  codi = Codi(backbone, rngs=nnx.Rngs(0))
  questions = [[4, 5, 6], [7, 8, 9, 10, 11], [20, 21]]
  out = {}
  for low in (MIN, None):
    decoder = CodiDecoder(
      codi, SPECIAL, [], opts=CodiOptions(num_latent=3), max_new_tokens=N, buckets=8,
      min_capacity=low,
    )  # fmt: skip
    for mode in ("student", "teacher"):
      out[mode, low] = [d.tokens for d in decoder.generate(questions, mode, batch_size=3)]
    # Student: bucket 8 + 3 thoughts + [eot] = 12 filled, then 16, 32, 52; teacher: 16, 32, 48.
    growths = {m: decoder.model.compiles_of(f"{m}_resume") for m in ("student", "teacher")}
    assert growths == ({"student": 2, "teacher": 2} if low else {"student": 0, "teacher": 0})
  for mode in ("student", "teacher"):
    assert out[mode, MIN] == out[mode, None]
    assert sum(map(len, out[mode, None])) > N  # long answers: the buckets were crossed


def test_length_aware_decoding_keeps_the_cache_sharded(tmp_path):
  """On a 4-device (data 2, tensor 2) CPU mesh: the paused segment's cache keeps its logical axes
  (batch over data, kv heads over tensor), and the tokens equal the unsharded fixed path."""
  script = textwrap.dedent(
    """
    import json
    from codi_jax import sharding
    from codi_jax.batching import left_pad
    from codi_jax.decoding import Generator
    from codi_jax.models import config as mcfg, transformer

    V = 64
    model = transformer.build(mcfg.tiny("llama", vocab_size=V, num_layers=1), seed=0)
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13], [14]]
    fixed = Generator(model, 0, [V + 1], min_capacity=None)(prompts, 40, length_bucket=8)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
    with sharding.use_mesh(mesh):
      gen = Generator(model, 0, [V + 1], min_capacity=8)
      grown = gen(prompts, 40, length_bucket=8)
      ids, mask = (gen.model.put_batch(x) for x in left_pad(prompts, 0, 8))
      seg, _ = gen._run._start(ids, mask, gen.eos, capacity=16, last=False, max_new=40)
    print(json.dumps({
      "equal": grown == fixed, "capacity": gen.last_capacity,
      "spec": list(seg.cache.k.sharding.spec),
    }))
    """
  )
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
    [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert res["equal"] and res["capacity"] == 48
  assert res["spec"] == [None, "data", None, "tensor"], res  # [layers, B, T, K, Dh]
