"""Resources checked before allocation: positions and memory of every decoder call (its last
cache bucket, per device), and the compiled train step against the free memory."""

from __future__ import annotations

import os
import types

import pytest
import tiny_codi
from flax import nnx

from codi_jax import decoding, train_lib
from codi_jax.codi.decoder import CodiDecoder
from codi_jax.codi.model import Codi, CodiOptions
from codi_jax.data.codi_batches import SpecialIds
from codi_jax.errors import InputError
from codi_jax.models import cache as kvc
from codi_jax.models import config, memory, transformer
from codi_jax.models.jitted import JittedModel
from soft_jax.decode import SoftDecoder
from soft_jax.sampling import SamplerParams

HUGE = 100_000_000


@pytest.fixture(scope="module")
def tiny():
  return transformer.build(config.tiny("llama", max_positions=64))


def one_line(info) -> str:
  message = str(info.value)
  assert "\n" not in message
  return message


# ---------------------------------------------------------------------------------------------
# Estimates


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_length_aware_bytes(arch):
  cfg = config.tiny(arch)
  one = memory.length_aware_bytes(cfg, 3, (300,), prompt_len=40)
  assert one == memory.decode_bytes(cfg, 3, 300, prompt_len=40)  # the fixed path
  caps = kvc.capacities(40, 40 + 5000, 256)
  assert caps[-1] == 5040 and len(caps) > 2
  grown = memory.length_aware_bytes(cfg, 3, caps, prompt_len=40)
  # Both of the last two caches are live during the last growth; the prefill sees the first only.
  want = memory.kv_cache_bytes(cfg, 3, caps[-1]) + memory.kv_cache_bytes(cfg, 3, caps[-2])
  assert grown >= want
  assert grown < memory.decode_bytes(cfg, 3, caps[-1], prompt_len=40) + want


def test_per_device_share():
  cfg = config.tiny("llama")  # 4 heads, 2 kv heads
  mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 2})
  rules = {"batch": ("data", "fsdp"), "act_kv": ("tensor",)}
  dev_cfg, batch = memory.per_device(cfg, 8, mesh, rules)
  assert batch == 2 and (dev_cfg.num_heads, dev_cfg.num_kv_heads) == (2, 1)
  assert memory.per_device(cfg, 6, mesh, rules)[1] == 6  # not divisible: replicated
  assert memory.per_device(cfg, 8, None, None) == (cfg, 8)


def test_check_positions():
  gpt2, llama = config.tiny("gpt2", max_positions=64), config.tiny("llama", max_positions=64)
  memory.check_positions(gpt2, 14, 50)  # exactly the 64 positions
  with pytest.raises(InputError) as info:
    memory.check_positions(gpt2, 14, 51, allow_extrapolation=True)
  assert one_line(info) == (
    "--max_new_tokens: got 51; a 14-token prompt + 51 new tokens need 65 positions, and the model "
    "(gpt2) has 64 learned positions; expected <= 50"
  )
  with pytest.raises(InputError) as info:
    memory.check_positions(llama, 14, 51)
  assert "past the model's context of 64; expected <= 50, or pass --allow_extrapolation" in str(
    info.value
  )
  memory.check_positions(llama, 14, 51, allow_extrapolation=True)  # RoPE: the user's call


# ---------------------------------------------------------------------------------------------
# Decoders refuse before allocating


def test_generator_refuses_a_huge_budget_without_allocating(tiny):
  gen = decoding.Generator(tiny, pad_id=0, eos_ids=[1])
  with pytest.raises(InputError) as info:
    gen([[5, 6, 7]], HUGE)
  message = one_line(info)
  assert message.startswith(f"max_new_tokens={HUGE}: 1 row x {32 + HUGE} cache slots")
  assert "needs about" in message and "is available" in message
  assert gen.compiles == 0 and gen.last_capacity is None  # nothing was traced or run


def test_generator_checks_against_the_available_memory(tiny, monkeypatch):
  gen = decoding.Generator(tiny, pad_id=0, eos_ids=[1])
  caps = kvc.capacities(32, 32 + 4, gen.min_capacity)
  need = memory.length_aware_bytes(tiny.cfg, 2, caps, prompt_len=32) + 2 * 4 * 4
  assert gen.check_memory(2, caps, 32, 4) == need
  monkeypatch.setattr(memory, "available_bytes", lambda device=None: need - 1)
  with pytest.raises(InputError, match="needs about .* but only"):
    gen([[5, 6, 7], [8]], 4)
  monkeypatch.setattr(memory, "available_bytes", lambda device=None: need)
  assert len(gen([[5, 6, 7], [8]], 4)) == 2


@pytest.mark.parametrize("record", [False, True])
def test_soft_decoder_refuses_a_huge_budget(tiny, record):
  dec = SoftDecoder(tiny, SamplerParams(mode="soft", top_k=8, max_topk=4), pad_id=0, eos_ids=[1])
  with pytest.raises(InputError) as info:
    dec([[5, 6, 7]], max_new_tokens=HUGE, record=record)
  assert "needs about" in one_line(info)
  assert dec.compiles == 0


def test_soft_decoder_counts_its_records(tiny, monkeypatch):
  class Seen(Exception):
    pass

  def spy(*args, **kwargs):
    raise Seen(kwargs["out_bytes_per_token"])

  monkeypatch.setattr(memory, "check_decode", spy)
  dec = SoftDecoder(tiny, SamplerParams(mode="soft", top_k=8, max_topk=4), pad_id=0, eos_ids=[1])
  for record, per_token in ((False, 4), (True, 4 + 4 * 8 + 5)):  # tokens; + idx, w, entropy, flag
    with pytest.raises(Seen) as info:
      dec([[5]], max_new_tokens=3, record=record)
    assert info.value.args[0] == per_token


def tiny_codi_model():
  backbone = transformer.build(config.tiny("gpt2", max_positions=64))
  codi = Codi(backbone, rngs=nnx.Rngs(params=0))
  v = backbone.cfg.vocab_size
  return codi, SpecialIds(pad=v - 3, bot=v - 2, eot=v - 1, eos=1)


@pytest.mark.parametrize("mode", ["student", "teacher"])
def test_codi_decoder_refuses_a_huge_budget(mode):
  codi, special = tiny_codi_model()
  dec = CodiDecoder(codi, special, [1], opts=CodiOptions(num_latent=2), max_new_tokens=HUGE)
  with pytest.raises(InputError) as info:
    dec.generate([[5, 6, 7]], mode, 4)
  assert one_line(info).startswith(f"{mode} max_new_tokens={HUGE}: 4 rows x ")
  assert dec.compiles == 0


def test_codi_decoder_reads_the_config_off_a_graphdef():
  """Training's validator holds only the graphdef (weights per call): the config still counts."""
  codi, special = tiny_codi_model()
  graphdef, _ = nnx.split(codi)
  jm = JittedModel(graphdef=graphdef)
  assert jm.config == codi.backbone.cfg
  dec = CodiDecoder(jm, special, [1], opts=CodiOptions(num_latent=2), max_new_tokens=HUGE)
  with pytest.raises(InputError, match="needs about"):
    dec.check_memory([[5, 6, 7]], "student", 4)


# ---------------------------------------------------------------------------------------------
# Training


def fake_compiled(temp, output, alias=0):
  stats = types.SimpleNamespace(
    temp_size_in_bytes=temp, output_size_in_bytes=output, alias_size_in_bytes=alias
  )
  return types.SimpleNamespace(memory_analysis=lambda: stats)


def test_check_compiled_margin():
  gib = memory.GiB
  ok = fake_compiled(10 * gib, 2 * gib, alias=1 * gib)  # 11 GiB beyond the arguments
  assert memory.check_compiled(ok, "step", available=10 * gib) is ok  # 1.1x margin
  with pytest.raises(InputError) as info:
    memory.check_compiled(fake_compiled(12 * gib, 0), "step", available=10 * gib)
  assert one_line(info).startswith(
    "step: needs about 12.00 GiB per device beyond its arguments (XLA's compiled memory analysis: "
    "temporaries 12.00 GiB) but only 10.00 GiB is available (refused above 1.1x)"
  )
  none = types.SimpleNamespace(memory_analysis=lambda: None)
  assert memory.check_compiled(none, "step", available=0) is none


def test_training_refuses_a_step_that_cannot_fit(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1 << 10)
  with pytest.raises(InputError) as info:
    train_lib.train_and_evaluate(tiny_codi.get_config(), str(tmp_path))
  assert one_line(info).startswith("--config: the train step: needs about ")
  assert "compiled train step" in capsys.readouterr().out  # the memory report came first
  assert not os.path.exists(tmp_path / ".lock")  # released
  ckpts = tmp_path / "checkpoints"
  assert not ckpts.exists() or not os.listdir(ckpts)
