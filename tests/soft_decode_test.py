"""soft_jax.decode: equivalence with greedy, phases (Cold Stop, `</think>`, budget), per-row
independence, compiles, seeds; on tiny random models (and SmolLM2, marked slow)."""
# pylint: disable=invalid-name

import assets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codi_jax.decoding import Generator, prefill
from codi_jax.errors import InputError
from codi_jax.models import config as mcfg
from codi_jax.models import transformer
from codi_jax.models.step import step
from soft_jax import decode, sampling, thinking
from soft_jax.decode import SoftDecoder
from soft_jax.sampling import SamplerParams

V = 64
N = 16  # max new tokens
PAD = 0
EOS = V + 1  # never emitted: rows run to the length limit unless a test sets a stop id
PROMPTS = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13]]
# Static fields shared by the soft decoders below (float knobs vary per call without recompiling).
SOFT = SamplerParams(mode="soft", max_topk=4, top_k=30, after_top_k=4, cold_stop_entropy=0.0)


def tiny_model(dtype="float32", seed=0):
  """A tiny Llama whose weights are scaled up, so its continuations vary and entropies spread."""
  m = transformer.build(mcfg.tiny("llama", vocab_size=V, dtype=dtype, param_dtype=dtype), seed=seed)
  nnx.update(m, jax.tree.map(lambda x: x * 6.0, nnx.state(m, nnx.Param)))
  return m


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture(scope="module")
def greedy_tokens(model):
  return Generator(model, pad_id=PAD, eos_ids=[EOS])(PROMPTS, N)


@pytest.fixture(scope="module")
def soft_dec(model):
  """The shared soft decoder (record=True in every use, so one compile serves the module)."""
  return SoftDecoder(model, SOFT, pad_id=PAD, eos_ids=[EOS])


def run(dec, params=None, think_end=None, eos=(EOS,), prompts=PROMPTS, **kw):
  dec.think_end_id, dec.eos_ids = think_end, tuple(eos)
  return dec(prompts, max_new_tokens=N, params=params, record=True, **kw)


def first_at(seq, tok):
  return seq.index(tok) if tok in seq else None


# ---------------------------------------------------------------------------------------------
# Reduction to greedy


def test_soft_with_k1_or_zero_temperature_and_greedy_mode_equal_generator(
  model, greedy_tokens, soft_dec
):
  k1 = SoftDecoder(model, SOFT.replace(max_topk=1), pad_id=PAD, eos_ids=[EOS])
  assert [r.tokens for r in k1(PROMPTS, max_new_tokens=N)] == greedy_tokens
  t0 = run(soft_dec, SOFT.replace(temperature=0.0))
  assert [r.tokens for r in t0] == greedy_tokens
  greedy = SoftDecoder(model, SamplerParams(mode="greedy"), pad_id=PAD, eos_ids=[EOS])
  assert [r.tokens for r in greedy(PROMPTS, max_new_tokens=N)] == greedy_tokens
  # Not vacuous: at T = 1 the concept tokens mix, and the trace leaves the greedy one.
  soft = run(soft_dec, SOFT.replace(temperature=1.0))
  assert any(np.any(r.records["w"][:, 1] > 0.01) for r in soft)
  assert [r.tokens for r in soft] != greedy_tokens


# ---------------------------------------------------------------------------------------------
# Phases


def test_cold_stop_after_exactly_patience_low_entropy_steps(soft_dec):
  end = V - 1
  # theta above ln V: every step is low-entropy, so thinking ends at step P exactly.
  res = run(
    soft_dec,
    SOFT.replace(temperature=1.0, cold_stop_entropy=100.0, cold_stop_patience=5),
    think_end=end,
  )
  for r in res:
    assert r.thinking_tokens == 5 and r.thinking_closed
    assert r.tokens[4] == end and end not in r.tokens[:4]
    np.testing.assert_array_equal(r.records["thinking"], np.arange(len(r.tokens)) < 5)
    # From `</think>` on, the inputs are one-hot on the emitted token.
    np.testing.assert_array_equal(r.records["w"][4:], np.eye(4)[[0] * (len(r.tokens) - 4)])
    np.testing.assert_array_equal(r.records["idx"][4:, 0], r.tokens[4:])
  # theta = 0 disables it: the rows think until the budget runs out.
  res = run(soft_dec, SOFT.replace(temperature=1.0, cold_stop_entropy=0.0), think_end=end)
  for r in res:
    assert (r.thinking_tokens, r.thinking_closed, r.answer_tokens) == (len(r.tokens), False, [])


def test_thinking_budget_forces_think_end(soft_dec):
  res = run(soft_dec, SOFT.replace(temperature=1.0, max_thinking_tokens=7), think_end=V - 1)
  for r in res:
    assert r.thinking_tokens == 7 and r.tokens[6] == V - 1 and len(r.answer_tokens) == N - 7


def test_budget_without_think_end_token_keeps_the_emitted_token(soft_dec):
  """SmolLM2-like models: no `</think>`; the budget switches the phase without inserting one."""
  free = run(soft_dec, SOFT.replace(temperature=1.0))
  res = run(soft_dec, SOFT.replace(temperature=1.0, max_thinking_tokens=6, after_temperature=0.0))
  for f, r in zip(free, res):
    assert r.thinking_tokens == 6 and r.thinking_closed
    assert r.tokens[:6] == f.tokens[:6]
    np.testing.assert_array_equal(r.records["w"][5:, 0], 1.0)


def replay_logits(model, prompt, records):
  """Logits of every step, re-run with the shared `step` from the recorded inputs (eager, one row)."""
  ids = jnp.asarray([prompt], jnp.int32)
  logits, cache, pos = prefill(model, ids, jnp.ones_like(ids, bool), len(prompt) + N)
  out = [logits[0]]
  params = SOFT
  for t in range(len(records["idx"]) - 1):
    x = decode.embed_input(
      model, params, jnp.asarray(records["idx"][t : t + 1]), jnp.asarray(records["w"][t : t + 1])
    )
    res = step(model, x[:, None], pos[:, None], cache)
    cache, pos = res.cache, pos + 1
    out.append(res.logits[0])
  return np.stack([np.asarray(o) for o in out])


def test_think_end_switches_rows_independently_to_the_answer_phase(model, soft_dec):
  """`</think>` in the trace: that row (only) goes one-hot with the after-thinking parameters."""
  params = SOFT.replace(temperature=1.0)
  free = [r.tokens for r in run(soft_dec, params)]
  # A token that row 0 emits first at step j0 >= 2 and row 1 first at another step (or never).
  end = next(
    t
    for j, t in enumerate(free[0])
    if j >= 2 and first_at(free[0], t) == j and first_at(free[1], t) != j
  )
  j0, j1 = first_at(free[0], end), first_at(free[1], end)
  # The answer phase samples softmax(z / 5) over the top 4: visibly not the thinking argmax.
  res = run(soft_dec, params.replace(after_temperature=5.0, after_top_p=1.0), think_end=end)
  switch = [first_at(f, end) for f in free]
  for b, (r, f, j) in enumerate(zip(res, free, switch)):
    if j is None:  # this row never emits `</think>`: it keeps thinking, exactly as before
      assert r.tokens == f and not r.thinking_closed
      continue
    assert r.thinking_closed and r.thinking_tokens == j + 1, b
    assert r.tokens[: j + 1] == f[: j + 1]  # identical trace up to and including `</think>`
    assert r.answer_tokens == r.tokens[j + 1 :]
    np.testing.assert_array_equal(r.records["thinking"], np.arange(len(r.tokens)) <= j)
    w, idx = r.records["w"], r.records["idx"]
    assert np.all(w[j:, 0] == 1.0) and np.all(idx[j:, 0] == r.tokens[j:])  # one-hot from </think>
    logits = replay_logits(model, PROMPTS[b], r.records)
    top4 = np.argsort(-logits, axis=1)[:, :4]
    assert all(r.tokens[t] == top4[t, 0] for t in range(j + 1))  # thinking: the top-1
    assert all(r.tokens[t] in top4[t] for t in range(j + 1, len(r.tokens)))  # after_top_k = 4
  answers = [
    t
    for r, j in zip(res, switch)
    if j is not None
    for t, lg in zip(
      r.answer_tokens, replay_logits(model, PROMPTS[res.index(r)], r.records)[j + 1 :]
    )
    if t != np.argmax(lg)
  ]
  assert answers, "after_temperature=5 never left the argmax: the answer phase ignored it"
  assert j0 != j1  # the rows switched at different steps within one batch


def test_eos_stops_a_row_even_while_thinking(soft_dec):
  params = SOFT.replace(temperature=1.0)
  free = [r.tokens for r in run(soft_dec, params)]
  stop = free[2][5]
  res = run(soft_dec, params, eos=(stop,))
  for r, f in zip(res, free):
    j = first_at(f, stop)
    if j is None:
      assert r.tokens == f and r.stop_reason == "length"
    else:
      assert r.tokens == f[: j + 1] and r.stop_reason == "eos"
      assert r.thinking_tokens == j + 1 and r.answer_tokens == []


def test_transition_cold_stop_counts_consecutive_steps_per_row():
  """Hand-made entropies: P = 3; row 0 is interrupted once, row 1 never low, row 2 at once."""
  params = SOFT.replace(cold_stop_entropy=0.1, cold_stop_patience=3)
  H = np.array([[0.01, 0.01, 0.5, 0.01, 0.01, 0.01, 0.01], [0.5] * 7, [0.01] * 7], np.float32)
  B, K, end = 3, 4, 9
  st = decode.init_state(B, 7, K, PAD, record=True)
  idx = jnp.tile(jnp.arange(10, 10 + K, dtype=jnp.int32), (B, 1))
  w = jnp.tile(jnp.asarray([0.4, 0.3, 0.2, 0.1], jnp.float32), (B, 1))
  for i in range(7):
    s = sampling.Sampled(jnp.full((B,), 20 + i, jnp.int32), idx, w, jnp.asarray(H[:, i]))
    st, _, _ = decode.transition(
      params, st, s, i, think_end_id=end, eos_ids=[EOS], pad_id=PAD, max_new=7
    )
  toks = np.asarray(st.tokens)
  assert toks[0].tolist() == [20, 21, 22, 23, 24, end, 26]  # the 3rd consecutive low step
  assert toks[1].tolist() == [20, 21, 22, 23, 24, 25, 26]
  assert toks[2].tolist() == [20, 21, end, 23, 24, 25, 26]
  assert np.asarray(st.n_think).tolist() == [6, 7, 3]
  assert np.asarray(st.in_think).tolist() == [False, True, False]
  thinking = np.asarray(st.records.thinking)
  assert thinking.sum(1).tolist() == [6, 7, 3]
  # Soft inputs while thinking, one-hot afterwards.
  w_rec = np.asarray(st.records.w)
  np.testing.assert_allclose(w_rec[1], np.tile([0.4, 0.3, 0.2, 0.1], (7, 1)))
  np.testing.assert_array_equal(w_rec[2, 2:], np.tile([1, 0, 0, 0], (5, 1)))
  np.testing.assert_array_equal(np.asarray(st.records.idx)[2, 2:, 0], [end, 23, 24, 25, 26])


def test_transition_token_baselines_have_no_cold_stop_and_abort_is_opt_in():
  B, K = 1, 4
  idx = jnp.zeros((B, K), jnp.int32)
  w = jnp.asarray([[1.0, 0, 0, 0]])

  def go(params, in_think, steps=4):
    st = decode.init_state(B, steps, K, PAD)._replace(in_think=jnp.asarray([in_think]))
    for i in range(steps):
      s = sampling.Sampled(jnp.asarray([20], jnp.int32), idx, w, jnp.asarray([0.0]))
      st, _, _ = decode.transition(
        params, st, s, i, think_end_id=9, eos_ids=[EOS], pad_id=PAD, max_new=steps
      )
    return st

  low = {"cold_stop_entropy": 0.1, "cold_stop_patience": 2, "max_topk": K}
  assert bool(go(SamplerParams(mode="sample", **low), True).in_think[0])
  assert not bool(go(SamplerParams(mode="soft", **low), True).in_think[0])
  st = go(SamplerParams(mode="soft", answer_low_entropy_abort=True, **low), False)
  assert int(st.n[0]) == 2 and decode.STOP_REASONS[int(st.stop[0])] == "abort"
  st = go(SamplerParams(mode="soft", **low), False)
  assert int(st.n[0]) == 4 and decode.STOP_REASONS[int(st.stop[0])] == "length"


# ---------------------------------------------------------------------------------------------
# Compiles, seeds, batch invariance


def test_one_compile_per_bucket_and_seeds(model):
  dec = SoftDecoder(
    model, SamplerParams(mode="gumbel", max_topk=4, min_p=0.0), pad_id=PAD, eos_ids=[EOS]
  )
  a = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13]]
  b = [[20, 21], [22, 23, 24, 25, 26, 27], [28]]
  ra = dec(a, max_new_tokens=N, seed=0)
  rb = dec(b, max_new_tokens=N, seed=0)
  assert [r.tokens for r in ra] != [r.tokens for r in rb]
  # Same seed, same output; another seed or tau, another output: all without recompiling.
  assert [r.tokens for r in dec(a, max_new_tokens=N, seed=0)] == [r.tokens for r in ra]
  assert [r.tokens for r in dec(a, max_new_tokens=N, seed=1)] != [r.tokens for r in ra]
  tau = dec.params.replace(gumbel_tau=2.0)
  assert [r.tokens for r in dec(a, max_new_tokens=N, seed=0, params=tau)] != [r.tokens for r in ra]
  # Draws follow the sample id, not the batch slot: swapped rows and ids give swapped outputs.
  swapped = dec(a[::-1], max_new_tokens=N, seed=0, sample_ids=[2, 1, 0])
  assert [r.tokens for r in swapped] == [r.tokens for r in ra][::-1]
  assert dec.compiles == 1


@pytest.mark.parametrize("mode", ["sample", "dirichlet"])
def test_seeds(model, mode):
  dec = SoftDecoder(
    model,
    SamplerParams(mode=mode, max_topk=4, temperature=1.0, min_p=0.0),
    pad_id=PAD,
    eos_ids=[EOS],
  )
  r0 = [r.tokens for r in dec(PROMPTS, max_new_tokens=N, seed=0)]
  assert [r.tokens for r in dec(PROMPTS, max_new_tokens=N, seed=0)] == r0
  assert [r.tokens for r in dec(PROMPTS, max_new_tokens=N, seed=1)] != r0
  assert dec.compiles == 1


def test_bfloat16_model_runs():
  m = tiny_model("bfloat16")
  dec = SoftDecoder(
    m,
    SOFT.replace(temperature=1.0, max_thinking_tokens=5),
    pad_id=PAD,
    eos_ids=[EOS],
    think_end_id=V - 1,
  )
  res = dec(PROMPTS, max_new_tokens=8, record=True)
  for r in res:
    assert r.thinking_tokens == 5 and r.tokens[4] == V - 1 and len(r.tokens) == 8
    assert np.all(np.isfinite(r.records["w"])) and np.all(np.isfinite(r.records["entropy"]))
    assert all(0 <= t < V for t in r.tokens)
  x = decode.embed_input(m, SOFT, jnp.asarray([[3, 4, 5, 6]]), jnp.asarray([[0.4, 0.3, 0.2, 0.1]]))
  assert x.dtype == jnp.bfloat16


def test_bad_inputs(model):
  with pytest.raises(InputError, match="^max_topk: "):
    SoftDecoder(model, SamplerParams(max_topk=31), pad_id=PAD, eos_ids=[EOS])
  with pytest.raises(InputError, match="^max_topk: .*vocabulary"):
    SoftDecoder(model, SamplerParams(top_k=0, max_topk=V + 1), pad_id=PAD, eos_ids=[EOS])
  dec = SoftDecoder(model, SOFT, pad_id=PAD, eos_ids=[EOS], think_end_id=V)
  with pytest.raises(InputError, match="^think_end_id: "):
    dec(PROMPTS, max_new_tokens=4)
  dec.think_end_id = None
  with pytest.raises(InputError, match="^max_new_tokens: "):
    dec(PROMPTS, max_new_tokens=0)
  with pytest.raises(InputError, match="^gumbel_tau: "):
    dec(PROMPTS, max_new_tokens=4, params=SOFT.replace(gumbel_tau=-1.0))
  with pytest.raises(InputError, match="^sample_ids: "):
    dec(PROMPTS, max_new_tokens=4, sample_ids=[0, 1])
  assert dec.compiles == 0


# ---------------------------------------------------------------------------------------------
# Tokenizer helpers and SmolLM2


class _WordTok:
  """Splits on spaces, then matches the longest vocabulary prefix ("\n" is a word)."""

  def __init__(self, words):
    self.ids = {w: i for i, w in enumerate(words)}

  def token_to_id(self, token):
    return self.ids.get(token)

  def encode(self, text, add_special_tokens=False):
    del add_special_tokens
    out = []
    for chunk in text.replace("\n", " \n ").split(" "):
      while chunk:
        word = max((w for w in self.ids if chunk.startswith(w)), key=len)
        out.append(self.ids[word])
        chunk = chunk[len(word) :]
    return out


def test_resolve_think_end_and_open_thinking():
  tok = _WordTok(["a", "b", "<think>", "</think>", "\n", "</", "think>"])
  assert thinking.resolve_think_end(tok) == 3
  assert (
    thinking.resolve_think_end(tok, "none") is None and thinking.resolve_think_end(tok, "") is None
  )
  assert thinking.resolve_think_end(tok, "b") == 1
  with pytest.raises(InputError, match="^--think_end: .*2 tokens"):
    thinking.resolve_think_end(tok, "</ think>")
  assert thinking.resolve_think_end(tok, "</ think>", last_id=True) == 6
  assert thinking.open_thinking(tok, [0, 1]) == [0, 1, 2, 4]
  assert thinking.open_thinking(tok, [0, 1, 2, 4]) == [0, 1, 2, 4]
  assert thinking.resolve_think_end(_WordTok(["a", "</", "think>"])) is None  # auto: none


@pytest.fixture(scope="module")
def smol():
  assets.smollm2_path()
  from codi_jax.models import loader  # pylint: disable=import-outside-toplevel

  return loader.load("smollm2")


@pytest.mark.slow
def test_smollm2_soft_k1_equals_greedy_and_gumbel_runs(smol):
  tok = smol.tokenizer
  assert thinking.resolve_think_end(tok) is None  # no `</think>` token: thinking ends by budget
  prompt = [tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}]))]
  want = Generator(smol.model, pad_id=tok.pad_id, eos_ids=tok.eos_ids)(prompt, 8)
  dec = SoftDecoder(
    smol.model, SamplerParams(mode="soft", max_topk=1), pad_id=tok.pad_id, eos_ids=tok.eos_ids
  )
  assert [r.tokens for r in dec(prompt, max_new_tokens=8)] == want
  g = SoftDecoder(
    smol.model,
    SamplerParams(mode="gumbel", max_thinking_tokens=4),
    pad_id=tok.pad_id,
    eos_ids=tok.eos_ids,
  )
  (r,) = g(prompt, max_new_tokens=8, record=True)
  assert r.thinking_tokens == 4 and len(r.tokens) <= 8
  assert np.all(r.records["w"][3:, 0] == 1.0)
