"""The one jitted-model helper: split once, pure jitted functions of the weights, one compile per
shape bucket for every entry point built on it (Generator, SoftDecoder, CodiDecoder, analyses)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from codi_jax.codi.decoder import CodiDecoder
from codi_jax.codi.model import Codi, CodiOptions
from codi_jax.data.codi_batches import SpecialIds
from codi_jax.decoding import Generator
from codi_jax.models import config as mcfg
from codi_jax.models import transformer
from codi_jax.models.jitted import JittedModel
from soft_jax import decode, sampling, traces

V = 64


def tiny_model():
  return transformer.build(mcfg.tiny("llama", vocab_size=V), seed=1)


def test_jitted_model_counts_traces_per_signature_and_takes_new_states():
  model = tiny_model()
  jm = JittedModel(model)

  def last_logits(m, ids):
    return m(ids, positions=jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)).logits[:, -1]

  fn = jm.jit(last_logits)
  a = fn(jnp.ones((2, 4), jnp.int32))
  fn(jnp.zeros((2, 4), jnp.int32))  # same shape: no new trace
  fn(jnp.ones((2, 8), jnp.int32))  # a new bucket: one more
  assert jm.compiles == 2 and jm.compiles_of("last_logits") == 2 and not jm.retraced()
  # A state of the same structure is an argument, not a constant: no recompile, new values.
  doubled = jax.tree.map(lambda x: 2 * x, jm.state)
  b = fn(jnp.ones((2, 4), jnp.int32), state=doubled)
  assert jm.compiles == 2
  assert not np.allclose(np.asarray(a), np.asarray(b))
  want = jm.merge(jm.state)(
    jnp.ones((2, 4), jnp.int32), positions=jnp.broadcast_to(jnp.arange(4), (2, 4))
  )
  np.testing.assert_allclose(np.asarray(a), np.asarray(want.logits[:, -1]), atol=1e-5)


def test_generator_and_soft_decoder_compile_once_per_bucket():
  model = tiny_model()
  gen = Generator(model, pad_id=0, eos_ids=[V - 1])
  short, long_ = [[5, 6, 7]], [list(range(1, 40))]
  gen(short, 4, length_bucket=16)
  gen([[9, 9]], 4, length_bucket=16)  # same (batch, bucket, max_new)
  assert gen.compiles == 1
  gen(long_, 4, length_bucket=16)  # a 48-token bucket
  assert gen.compiles == 2 and not gen.model.retraced()

  params = sampling.SamplerParams(mode="soft", temperature=0.7, max_topk=4)
  dec = decode.SoftDecoder(model, params, pad_id=0, eos_ids=[V - 1])
  dec(short, max_new_tokens=5, length_bucket=16)
  dec(short, max_new_tokens=5, length_bucket=16, params=params.replace(temperature=1.3))
  assert dec.compiles == 1  # float knobs are traced
  dec(long_, max_new_tokens=5, length_bucket=16)
  assert dec.compiles == 2 and not dec.model.retraced()


def tiny_codi():
  backbone = transformer.build(mcfg.tiny("gpt2", vocab_size=V), seed=2)
  return Codi(backbone, rngs=nnx.Rngs(0))


SPECIAL = SpecialIds(pad=V - 3, bot=V - 2, eot=V - 1, eos=1)


def test_codi_decoder_one_compile_per_bucket_and_num_latent_is_a_call_argument():
  codi = tiny_codi()
  decoder = CodiDecoder(
    codi, SPECIAL, [1], opts=CodiOptions(num_latent=3), max_new_tokens=5, buckets=8
  )
  questions = [[4, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15], [4, 5, 6], [20, 21]]
  out = decoder.generate(questions, "student", batch_size=2)
  assert decoder.model.compiles_of("student") == 2  # buckets 8 and 16
  assert out[0].tokens == out[2].tokens  # the same question, another batch
  decoder.generate(questions, "student", batch_size=2)
  assert decoder.model.compiles_of("student") == 2
  # Another thought count: the same module and decoder, one more program per bucket.
  model_before = decoder.model
  none = decoder.generate(questions, "student", batch_size=2, num_latent=0)
  assert decoder.model is model_before and decoder.model.compiles_of("student") == 4
  assert [d.tokens for d in none] != [d.tokens for d in out]  # the thoughts change the answers
  decoder.generate(questions, "teacher", batch_size=2)
  assert decoder.model.compiles_of("teacher") == 2
  tops = decoder.probe(questions, 2, k=3, source="pre_prj")
  assert tops[0][0].shape == (4, 3)  # bot + 3 thoughts, top-3 each
  assert decoder.model.compiles_of("thoughts") == 2 and not decoder.model.retraced()


def test_analysis_traces_run_through_the_helper_once():
  model = tiny_model()
  jm = JittedModel(model)
  fn = jm.jit(traces.logit_lens_trace, static_argnames=("steps", "norm"))
  ids, mask = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), bool)
  fn(ids, mask, 0.6, steps=3, norm=True)
  fn(ids, mask, 0.5, steps=3, norm=True)  # alpha is traced
  assert jm.compiles == 1


def test_codi_decoder_official_mode_batches_in_order_at_each_batch_maximum():
  """Official padding: one compiled width for the set, yet every batch (in input order, as the
  reference's test.py batches) decodes as if padded to its own longest question."""
  from codi_jax.batching import left_pad  # pylint: disable=import-outside-toplevel
  from codi_jax.codi import inference  # pylint: disable=import-outside-toplevel

  codi = tiny_codi()
  opts = CodiOptions(num_latent=2, padding_mode="official")
  decoder = CodiDecoder(codi, SPECIAL, [1], opts=opts, max_new_tokens=4, buckets=8)
  questions = [[4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22], [30]]
  out = decoder.generate(questions, "student", batch_size=2)
  assert decoder.model.compiles_of("student") == 1 and decoder.widths(questions, "student") == [16]
  for start in (0, 2):
    rows = [q + [SPECIAL.bot] for q in questions[start : start + 2]]
    ids, mask = left_pad(rows, SPECIAL.pad, max(len(r) for r in rows))  # the batch's own maximum
    toks, lens = inference.student_generate(
      codi, jnp.asarray(ids), jnp.asarray(mask), num_latent=2, padding_mode="official",
      eot_id=SPECIAL.eot, max_new=4, eos_ids=[1], pad_id=SPECIAL.pad,
      suppress=(SPECIAL.pad, SPECIAL.bot, SPECIAL.eot),
    )  # fmt: skip
    for j in range(2):
      assert out[start + j].tokens == np.asarray(toks[j, : lens[j]]).tolist()
