"""Probing continuous thoughts: LM-head top-k against numpy, pre-projection states, Table 3."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codi_jax.batching import left_pad
from codi_jax.codi import probe
from codi_jax.codi.model import Codi, encode_and_think
from codi_jax.models import config as mcfg
from codi_jax.models import transformer

N = 3


@functools.cache
def backbone(arch, tie):
  return transformer.build(mcfg.tiny(arch, tie_embeddings=tie), seed=1)


def tiny_codi(arch="gpt2", tie=True):
  return Codi(backbone(arch, tie), rngs=nnx.Rngs(params=2))


KW = {"num_latent": N, "padding_mode": "masked"}  # the method options of these probes


def jitted(fn, codi, ids, mask):
  """fn(codi, ids, mask) under jit (eager execution of the whole model is slow)."""
  graphdef, state = nnx.split(codi)
  return jax.jit(lambda st, i, m: fn(nnx.merge(graphdef, st), i, m))(state, ids, mask)


def question_batch(bot=127, pad=0):
  ids, mask = left_pad([[5, 9, 17, 33, bot], [40, 41, 42, 43, 44, 45, 46, bot]], pad, 8)
  return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("arch,tie", [("gpt2", True), ("llama", False)])
def test_head_top_k_equals_numpy(arch, tie):
  codi = tiny_codi(arch, tie=tie)
  ids, mask = question_batch()
  states, (probs, top) = jax.device_get(
    jitted(
      lambda c, i, m: (probe.thought_states(c, i, m, **KW), probe.probe_top_k(c, i, m, k=5, **KW)),
      codi,
      ids,
      mask,
    )
  )
  assert states.shape == (2, N + 1, codi.backbone.cfg.d_model)
  states = np.asarray(states, np.float64)
  bb = codi.backbone
  w_vd = np.asarray(bb.embed.embedding[...] if tie else bb.lm_head.kernel[...].T, np.float64)
  logits = states @ w_vd.T
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want_ids = np.argsort(-p, axis=-1)[..., :5]
  np.testing.assert_array_equal(top, want_ids)
  np.testing.assert_allclose(probs, np.take_along_axis(p, want_ids, -1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("padding_mode", ["masked", "official", "official_fixmask"])
def test_pre_projection_states_are_what_the_thoughts_project(padding_mode):
  """prj(state at bot) is thought 1 and prj(state after thought i) is thought i+1, in every mode."""
  codi = tiny_codi()
  ids, mask = question_batch()
  kw = {"num_latent": N, "padding_mode": padding_mode}

  def fn(c, i, m):
    pre = probe.thought_states(c, i, m, "pre_prj", **kw)
    batch = {"encoder_ids": i, "encoder_mask": m}
    _, _, thoughts = encode_and_think(c, batch, capacity_extra=0, **kw)
    return (
      c.project(pre[:, :N]),
      probe.thought_states(c, i, m, "post_prj", **kw),
      jnp.swapaxes(thoughts, 0, 1),
    )

  projected, post, thoughts = jitted(fn, codi, ids, mask)
  np.testing.assert_array_equal(post, thoughts)
  np.testing.assert_allclose(projected, post, atol=2e-5)


def test_no_thoughts_probes_the_bot_state_only():
  codi = tiny_codi()  # the same module: the thought count is a call argument
  ids, mask = question_batch()
  assert probe.thought_states(codi, ids, mask, num_latent=0).shape == (2, 1, 32)
  assert probe.thought_states(codi, ids, mask, "post_prj", num_latent=0).shape == (2, 0, 32)


@pytest.mark.parametrize(
  "text,value",
  [
    (" 13", 13.0),
    ("13", 13.0),
    ("-4", -4.0),
    ("1,200", 1200.0),
    (" 2.5", 2.5),
    (".5", 0.5),
    ("9.", 9.0),
    (" nine", None),
    ("13a", None),
    ("", None),
    (">>", None),
    ("-", None),
  ],
)
def test_token_value(text, value):
  assert probe.token_value(text) == value


@pytest.mark.parametrize(
  "record,want",
  [
    ({"results": [36, 33, 99], "cot": "<<4*9=36>>"}, [36.0, 33.0, 99.0]),  # synthetic: results win
    ({"cot": "<<16-3-4=9>> <<9*2=18>>"}, [9.0, 18.0]),  # GSM8k-Aug
    (
      {"answer": "48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"},
      [24.0, 72.0],
    ),
    ({"cot": "<<1,200-1000=200>> <<4*4=16.00>>"}, [200.0, 16.0]),
    ({"cot": "<<x>>"}, [None]),  # a step without a value: never matched
    ({"question": "q", "answer": "5"}, []),  # SVAMP-like: no steps
  ],
)
def test_reference_results(record, want):
  assert probe.reference_results(record) == want


def test_match_steps_any_thought_as_numbers():
  top = [
    [" 13", "13", " 12", " 11", "12"],
    ["-", " than", " instead", "->", ">>"],
    [" 9", "9", " 8", " far", " any"],
    ["9", " 9", " any", " 5", " 3"],
  ]
  assert probe.match_steps(top, [13.0, 9.0, 18.0]) == [[0], [2, 3], []]
  assert probe.match_steps(top, [None]) == [[]]
  assert probe.match_steps([], [1.0]) == [[]]


def test_table3_rates_by_step():
  problems = [
    {"found": [[0], [2], []]},  # 3 steps: steps 1, 2 matched
    {"found": [[0], []]},  # 2 steps: step 1 matched
    {"found": [[], [4]]},  # 2 steps: step 2 matched
    {"found": [[1]]},  # 1 step, matched
    {"found": []},  # no reference steps: not counted
  ]
  t3 = probe.table3(problems)
  assert t3["problems"] == 4
  assert [(s["step"], s["problems"], s["matched"]) for s in t3["steps"]] == [
    (1, 4, 3),
    (2, 3, 2),
    (3, 1, 0),
  ]
  assert [s["rate"] for s in t3["steps"]] == [0.75, pytest.approx(2 / 3), 0.0]
  assert t3["all_steps"] == {"problems": 4, "matched": 1, "rate": 0.25}
  assert probe.table3([]) == {
    "problems": 0,
    "steps": [],
    "all_steps": {"problems": 0, "matched": 0, "rate": None},
  }
  text = probe.format_table3(t3)
  assert (
    "75.0%" in text and "66.7%" in text and text.splitlines()[-1].split("|")[-1].strip() == "25.0%"
  )


def test_format_problem_block():
  entry = {
    "index": 7,
    "correct": True,
    "gold": 18.0,
    "prediction": "The answer is: 18",
    "question": "Janet's ducks...",
    "results": [9.0, 18.0],
    "found": [[2], []],
    "tokens": [[" 13", "13"], ["-", ">>"], [" 9", "9"]],
    "probs": [[0.5, 0.25], [0.3, 0.1], [0.6, 0.2]],
  }
  text = probe.format_problem(entry, "pre_prj")
  lines = text.splitlines()
  assert lines[0].startswith("problem 7 (correct) gold=18.0")
  assert lines[2] == "reference results: 9 (found: after thought 2), 18 (not found)"
  assert lines[3] == "  bot: ' 13'(0.50) '13'(0.25)"
  assert lines[5] == "  after thought 2: ' 9'(0.60) '9'(0.20)"
  assert probe.thought_label(0, "post_prj") == "thought 1"
