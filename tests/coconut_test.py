"""Coconut: curriculum (stage per step, thoughts per stage, replaced steps, padding to max), the
batches it rewrites, the loss against a plain Python loop, and a short training run that compiles
once per thought count and resumes at the right stage."""
# pylint: disable=invalid-name

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_codi
from flax import nnx

from codi_jax import train_lib
from codi_jax.codi import baselines, build
from codi_jax.codi.model import Codi, CodiOptions
from codi_jax.data import curriculum as cur
from codi_jax.data.codi_batches import CodiExamples, SpecialIds
from codi_jax.errors import InputError
from codi_jax.models import config as mcfg
from codi_jax.models import transformer
from configs import base

V = 40
IDS = SpecialIds(pad=V - 3, bot=V - 2, eot=V - 1, eos=1)


def codi_config(**overrides):
  return tiny_codi.codi_config("coconut", **overrides)


def examples():
  """Three examples with 1, 2 and 3 CoT steps and questions of different lengths."""
  qs = [[2, 3, 4], [5, 6], [7, 8, 9, 10]]
  steps = [[[11, 12]], [[13], [14, 15, 16]], [[17, 18], [19], [20, 21]]]
  answers = [[30, 31, 1], [32, 1], [33, 34, 1]]
  base_ex = CodiExamples(
    [np.asarray(q, np.int32) for q in qs],
    [np.asarray([t for s in ss for t in s], np.int32) for ss in steps],
    [np.asarray(a, np.int32) for a in answers],
    [0, 0, 0],
    [0, 1, 2],
    IDS,
  )
  lens = [np.asarray([len(s) for s in ss], np.int32) for ss in steps]
  return cur.StepExamples(base_ex, lens), qs, steps, answers


def local_batch(ex):
  shapes = cur.fit_coconut_shapes(ex, 4)
  rows = [cur.coconut_example(e, shapes, IDS) for e in ex]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_coconut_split_steps_keeps_the_text():
  aug = "<<4+8=12>> <<12-5=7>> <<7-3=4>>"
  assert cur.split_steps(aug) == ["<<4+8=12>>", " <<12-5=7>>", " <<7-3=4>>"]
  nl = "He has 3.5 kg. Then he buys 2 more!\nSo 5.5 in all.\n"
  assert cur.split_steps(nl) == ["He has 3.5 kg.", " Then he buys 2 more!", "\nSo 5.5 in all.\n"]
  assert "".join(cur.split_steps(nl)) == nl
  # iCoT multiplication: a step starts at each " + " (the next partial product).
  assert cur.split_steps("6 3 0 + 0 4 2 1") == ["6 3 0", " + 0 4 2 1"]
  assert cur.split_steps("6 3 0 2") == ["6 3 0 2"]  # no boundary: one step
  assert cur.split_steps("") == []


def test_coconut_stage_per_step_and_thoughts_per_stage():
  s = cur.CoconutSchedule(stage_steps=3, max_latent_stage=2, c_thought=2)
  assert [s.stage(t) for t in range(1, 14)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
  assert [s.phase(t) for t in (1, 4, 7, 10, 13, 100)] == [0, 1, 2, 3, 3, 3]
  assert [s.num_latent(k) for k in range(5)] == [0, 2, 4, 4, 4]  # compiled thought counts
  assert [s.eval_latent(k) for k in range(5)] == [0, 2, 4, 4, 4]
  mixed = cur.CoconutSchedule(3, 2, 2, uniform_prob=0.3)
  assert [mixed.num_latent(k) for k in range(4)] == [4, 4, 4, 4]  # any row may run the most
  # Stage length from epochs (the reference): epochs_per_stage x optimizer steps per epoch.
  c = cur.Curriculum("coconut", codi_config(epochs_per_stage=3), steps_per_epoch=5)
  assert c.coconut.stage_steps == 15 and c.num_latent(16) == 2 and c.eval_latent(15) == 0


def test_coconut_replaced_steps_and_padding_to_max():
  n = np.array([1, 2, 3, 5])
  pad = cur.CoconutSchedule(1, max_latent_stage=3, c_thought=2, pad_latent_to_max=True)
  # Stage k <= max: the first k steps go (all of a shorter CoT) for k * c thoughts, whatever n.
  for k, skip in [(0, [0, 0, 0, 0]), (1, [1, 1, 1, 1]), (2, [1, 2, 2, 2]), (3, [1, 2, 3, 3])]:
    got_skip, got_thoughts = pad.rows(k, n)
    assert got_skip.tolist() == skip and got_thoughts.tolist() == [2 * k] * 4, k
  # Past the last stage every step goes; thoughts stay at max * c, or min(n, max) * c unpadded.
  assert [x.tolist() for x in pad.rows(4, n)] == [[1, 2, 3, 5], [6, 6, 6, 6]]
  unpadded = cur.CoconutSchedule(1, 3, 2, pad_latent_to_max=False)
  assert [x.tolist() for x in unpadded.rows(4, n)] == [[1, 2, 3, 5], [2, 4, 6, 6]]
  assert [x.tolist() for x in unpadded.rows(3, n)] == [[1, 2, 3, 3], [6, 6, 6, 6]]
  # uniform_prob: rows drawn below it train at stage floor(pick * (n + 1)).
  mixed = cur.CoconutSchedule(1, 3, 2, uniform_prob=0.5)
  skip, thoughts = mixed.rows(3, n, np.array([0.1, 0.9, 0.2, 0.4]), np.array([0.99, 0.0, 0.0, 0.9]))
  assert skip.tolist() == [1, 2, 0, 5] and thoughts.tolist() == [2, 6, 0, 6]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_coconut_batch_drops_the_replaced_steps(stage):
  ex, qs, steps, answers = examples()
  cfg = codi_config(stage_steps=1, max_latent_stage=2, c_thought=2)
  c = cur.Curriculum("coconut", cfg, pad_id=IDS.pad)
  local = local_batch(ex)
  batch = c.batch(local, step=stage + 1)
  assert set(batch) == {
    "encoder_ids",
    "encoder_mask",
    "decoder_ids",
    "decoder_labels",
    "decoder_mask",
    "num_thoughts",
  }
  Lc = local["decoder_ids"].shape[1]
  for b in range(3):
    kept = steps[b][min(stage, 2) if stage <= 2 else len(steps[b]) :]
    want = [IDS.eot] + [t for s in kept for t in s] + answers[b]
    assert batch["decoder_ids"][b].tolist() == want + [IDS.pad] * (Lc - len(want)), b
    assert batch["decoder_labels"][b].tolist() == [-100] + want[1:] + [-100] * (Lc - len(want))
    assert batch["decoder_mask"][b].sum() == len(want)
    enc = batch["encoder_ids"][b][batch["encoder_mask"][b]].tolist()
    assert enc == qs[b] + [IDS.bot]
  assert batch["num_thoughts"].tolist() == [2 * min(stage, 2)] * 3


def python_loop_loss(backbone, ex_rows, thoughts):
  """Coconut's CE the slow way: per row, no padding, no cache, no scan; each thought is the last
  hidden state of a full forward over everything so far."""
  nll, count = 0.0, 0
  for (q, rest), n in zip(ex_rows, thoughts):
    seq = backbone.embed_tokens(jnp.asarray([q + [IDS.bot]]))
    for _ in range(n):
      pos = jnp.arange(seq.shape[1])[None]
      h = backbone(embeds=seq, positions=pos, logits="none").hidden[:, -1:]
      seq = jnp.concatenate([seq, h], 1)
    start = seq.shape[1]
    seq = jnp.concatenate([seq, backbone.embed_tokens(jnp.asarray([[IDS.eot] + rest]))], 1)
    logits = np.asarray(backbone(embeds=seq, positions=jnp.arange(seq.shape[1])[None]).logits[0])
    for i, tok in enumerate(rest):  # position start + i (eot, then each token) predicts tok
      row = logits[start + i].astype(np.float64)
      nll += np.log(np.exp(row - row.max()).sum()) + row.max() - row[tok]
      count += 1
  return nll / count


@pytest.mark.parametrize(
  "arch,stage,pad", [("gpt2", 1, True), ("llama", 2, True), ("gpt2", 3, False)]
)
def test_coconut_loss_equals_python_loop_with_hidden_states_fed_back(arch, stage, pad):
  ex, qs, steps, answers = examples()
  cfg = codi_config(stage_steps=1, max_latent_stage=2, c_thought=2, pad_latent_to_max=pad)
  c = cur.Curriculum("coconut", cfg, pad_id=IDS.pad)
  batch = c.batch(local_batch(ex), step=stage + 1)
  codi = Codi(transformer.build(mcfg.tiny(arch, vocab_size=V), seed=3), rngs=nnx.Rngs(0))
  opts = CodiOptions(method="coconut", num_latent=c.num_latent(stage + 1), use_prj=False)
  loss, metrics = jax.jit(baselines.coconut_loss, static_argnums=2)(
    codi, {k: jnp.asarray(v) for k, v in batch.items()}, opts
  )
  skip = [min(stage, len(s)) if stage <= 2 else len(s) for s in steps]
  rows = [(q, [t for s in ss[k:] for t in s] + a) for q, ss, k, a in zip(qs, steps, skip, answers)]
  want = python_loop_loss(codi.backbone, rows, batch["num_thoughts"].tolist())
  if stage == 3:
    assert batch["num_thoughts"].tolist() == [2, 4, 4]  # unpadded: min(steps, max) * c per row
  np.testing.assert_allclose(float(loss), want, rtol=0, atol=2e-5)
  assert float(metrics["ce_student"]) == float(loss)


def test_coconut_options_and_model_have_no_projection():
  cfg = codi_config(max_latent_stage=3, c_thought=2, padding_mode="official")
  opts = CodiOptions.from_config(cfg)
  assert (opts.num_latent, opts.use_prj, opts.padding_mode) == (6, False, "masked")
  cfg.num_latent_infer = 4
  assert CodiOptions.from_config(cfg, inference=True).num_latent == 4
  config = base.get_config()
  config.codi.method = "coconut"
  assert build.module_options(config)["use_prj"] is False


def test_coconut_optimizer_restarts_per_stage_or_per_epoch():
  cfg = codi_config(stage_steps=2, max_latent_stage=1)
  c = cur.Curriculum("coconut", cfg, steps_per_epoch=3)
  assert [t for t in range(1, 12) if c.reset_before(t)] == [3, 5]  # stages 1, 2; later ones alike
  cfg.reset_optimizer = "epoch"
  c = cur.Curriculum("coconut", cfg, steps_per_epoch=3)
  assert [t for t in range(1, 12) if c.reset_before(t)] == [4, 7, 10]
  cfg.reset_optimizer = "none"
  assert not any(cur.Curriculum("coconut", cfg).reset_before(t) for t in range(1, 12))


def test_coconut_stage_boundaries_for_three_step_cots():
  """The demo's schedule (stage k from step 160k + 1, max_latent_stage 3, c 2) on CoTs of exactly
  3 steps: the thoughts grow at 161, 321 and 481, after which every step is latent; stage 4 (641)
  trains as stage 3, so the optimizer restarts at 161, 321 and 481 only. A 4-step CoT in the set
  (stage 4 removes its last step) or unpadded thoughts on a 2-step CoT (6 -> 4) restart at 641."""
  cfg = codi_config(stage_steps=160, max_latent_stage=3, c_thought=2)
  ex = examples()[0]
  three = {k: v[2:] for k, v in local_batch(ex).items()}  # the 3-step example
  c = cur.Curriculum("coconut", cfg, pad_id=IDS.pad, cot_steps=three["num_steps"])
  steps = range(1, 801)

  def trained(t):  # what step t trains on: compiled thoughts, the row's thoughts and tokens
    b = c.batch(three, t)
    return c.num_latent(t), b["num_thoughts"].tolist(), b["decoder_ids"].tolist()

  seen = [trained(t) for t in steps]
  assert [t for t in steps[1:] if seen[t - 1] != seen[t - 2]] == [161, 321, 481]
  assert [s[:2] for s in seen[480::160]] == [(6, [6]), (6, [6])]  # steps 481 and 641
  assert [t for t in steps if c.reset_before(t)] == [161, 321, 481]
  assert [c.coconut.stage(t) for t in (480, 481, 640, 641)] == [2, 3, 3, 4]
  with_four = cur.Curriculum("coconut", cfg, cot_steps=[3, 4, 3])
  assert [t for t in steps if with_four.reset_before(t)] == [161, 321, 481, 641]
  unpadded = codi_config(stage_steps=160, max_latent_stage=3, c_thought=2, pad_latent_to_max=False)
  short = cur.Curriculum("coconut", unpadded, cot_steps=[2, 3])
  assert [t for t in steps if short.reset_before(t)] == [161, 321, 481, 641]
  unknown = cur.Curriculum("coconut", cfg)  # step counts not given: every stage switch restarts
  assert [t for t in steps if unknown.reset_before(t)] == [161, 321, 481, 641]
  cfg.reset_optimizer = "epoch"  # the reference: every epoch, stage boundaries or not
  ref = cur.Curriculum("coconut", cfg, steps_per_epoch=200, cot_steps=[3])
  assert [t for t in steps if ref.reset_before(t)] == [201, 401, 601]


def test_coconut_start_stage_skips_the_trained_stages():
  """coconut_start_stage=1 (a run from a CoT-SFT model, the reference's `resume`) on the 3-step
  CoT: step 1 trains what step 161 of a run from stage 0 trains, and so on at the same pace; the
  optimizer restarts at the two stage switches that change the batch (161, 321), not at 481."""
  cfg = codi_config(stage_steps=160, max_latent_stage=3, c_thought=2)
  three = {k: v[2:] for k, v in local_batch(examples()[0]).items()}
  scratch = cur.Curriculum("coconut", cfg, pad_id=IDS.pad, cot_steps=[3])
  cfg.coconut_start_stage = 1
  c = cur.Curriculum("coconut", cfg, pad_id=IDS.pad, cot_steps=[3])
  assert [c.coconut.stage(t) for t in (1, 160, 161, 320, 321, 480, 481)] == [1, 1, 2, 2, 3, 3, 4]
  assert c.coconut.first_step(4) == 481 and scratch.coconut.first_step(4) == 641
  for t in (1, 160, 161, 321, 481, 640):
    want, got = scratch.batch(three, t + 160), c.batch(three, t)
    assert want.keys() == got.keys() and c.num_latent(t) == scratch.num_latent(t + 160)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} at step {t}")
  assert c.batch(three, 1)["num_thoughts"].tolist() == [2] and c.eval_latent(1) == 2
  assert [t for t in range(1, 801) if c.reset_before(t)] == [161, 321]
  cfg.coconut_start_stage = 4  # past max_latent_stage: refused in one line
  with pytest.raises(
    InputError, match=r"coconut_start_stage: got 4; expected 0..max_latent_stage=3"
  ):
    cur.Curriculum("coconut", cfg)


def _run_config():
  c = tiny_codi.get_config("coconut")
  c.codi.stage_steps, c.codi.max_latent_stage, c.codi.c_thought = 1, 1, 1
  c.optim.num_steps = 3
  c.eval.every_steps, c.eval.num_examples, c.eval.max_new_tokens = 3, 4, 4
  c.checkpoint.every_steps, c.checkpoint.keep = 1, 5
  return c


def test_coconut_training_compiles_once_per_stage_and_resumes_at_its_stage(tmp_path):
  ref = tmp_path / "ref"
  summary = train_lib.train_and_evaluate(_run_config(), str(ref))
  assert summary["step_compiles"] == 2  # stage 0 (no thoughts), stages 1-2 (one thought)
  lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
  assert [x["coconut/stage"] for x in lines if "loss" in x] == [0, 1, 2]
  assert "valid/student_acc" in lines[-1]
  run = tmp_path / "run"
  shutil.copytree(ref, run)
  for d in ("final", "checkpoints/2", "checkpoints/3"):
    shutil.rmtree(run / d)
  summary = train_lib.train_and_evaluate(_run_config(), str(run))
  assert summary["resumed_from"] == 1 and summary["step_compiles"] == 1  # straight to stage 1
  want, got = tiny_codi.final_params(ref), tiny_codi.final_params(run)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
