"""iCoT-SI (stepwise internalization): the removal schedule, the smoothing distribution, removal on
literal token sequences, positions, the loss against plain CE on the shortened sequences, the
optimizer restart, and a short training run that compiles once and resumes on schedule."""
# pylint: disable=invalid-name

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_codi
from flax import nnx

from codi_jax import train_lib, train_step
from codi_jax.codi import baselines
from codi_jax.codi.model import Codi, CodiOptions
from codi_jax.data import codi_batches
from codi_jax.data import curriculum as cur
from codi_jax.data.codi_batches import CodiExamples, SpecialIds
from codi_jax.models import config as mcfg
from codi_jax.models import transformer
from configs import base

V = 40
IDS = SpecialIds(pad=V - 3, bot=V - 2, eot=V - 1, eos=1)
INF = math.inf


def codi_config(**overrides):
  return tiny_codi.codi_config("icot_si", **overrides)


def test_icot_removal_count_per_step():
  s = cur.ICoTSchedule(steps_per_removal=3)
  assert [s.scheduled(t) for t in range(1, 11)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
  s = cur.ICoTSchedule(steps_per_removal=2, remove_start_from=5, remove_all_beyond=8)
  assert [s.scheduled(t) for t in range(1, 9)] == [5, 5, 6, 6, 7, 7, INF, INF]
  s = cur.ICoTSchedule(steps_per_removal=0)  # the reference adds one at every batch, the first too
  assert [s.scheduled(t) for t in range(1, 5)] == [1, 2, 3, 4]
  # From config: round(steps_per_epoch / remove_per_epoch) steps per token.
  c = cur.Curriculum("icot_si", codi_config(remove_per_epoch=8.0), steps_per_epoch=100)
  assert c.icot.steps_per_removal == 12  # round(12.5), as Python's round
  c = cur.Curriculum("icot_si", codi_config(remove_per_epoch=8.0), steps_per_epoch=625)
  assert c.icot.steps_per_removal == 78
  # Per row: scheduled + offset, never past the row's CoT; everything once scheduled is inf.
  s = cur.ICoTSchedule(steps_per_removal=1, remove_all_beyond=6)
  assert s.removed(3, [5, 1, 9], [0, 0, 4]).tolist() == [2, 1, 6]
  assert s.removed(7, [5, 1, 9], [0, 0, 0]).tolist() == [5, 1, 9]


def test_icot_smoothing_distribution_probabilities_and_tail_mass():
  p = cur.smoothing_distribution(4.0)
  assert p.shape == (100,) and abs(p.sum() - 1) < 1e-12
  a = 1 - math.exp(-4)
  np.testing.assert_allclose(p[:3], [a, a * math.exp(-4), a * math.exp(-8)], rtol=1e-12)
  np.testing.assert_allclose(p[:3], [0.981684, 0.0179802, 3.29318e-4], rtol=1e-5)
  lam = 0.05  # a visible tail: the mass of o >= 100, e^(-100 lam), lands on o = 99
  p = cur.smoothing_distribution(lam)
  geometric = (1 - math.exp(-lam)) * math.exp(-lam * 99)
  np.testing.assert_allclose(p[99], geometric + math.exp(-100 * lam), rtol=1e-12)
  np.testing.assert_allclose(p[99], math.exp(-99 * lam), rtol=1e-12)
  assert abs(p.sum() - 1) < 1e-12
  assert cur.smoothing_distribution(INF).tolist() == [1.0] + [0.0] * 99
  # Offsets by inverse CDF: the draw's position in the cumulative distribution.
  p = cur.smoothing_distribution(1.0)
  u = np.array([0.0, p[0] - 1e-9, p[0], p[0] + p[1] + 1e-9])
  assert cur.sample_offsets(p, u).tolist() == [0, 0, 1, 2]
  tail = cur.smoothing_distribution(0.05)  # the last 0.7% of draws land on the tail entry
  assert cur.sample_offsets(tail, np.array([1 - 1e-3, 1 - 1e-12])).tolist() == [99, 99]
  draws = cur.sample_offsets(p, np.random.default_rng(0).random(200_000))
  np.testing.assert_allclose(np.bincount(draws, minlength=100)[:3] / 2e5, p[:3], atol=3e-3)


def examples():
  qs = [[2, 3, 4], [5, 6], [7, 8, 9, 10]]
  cots = [[20, 21, 22, 23], [24], [25, 26, 27, 28, 29, 19]]
  answers = [[30, 31, 1], [32, 1], [33, 34, 1]]
  arr = lambda xs: [np.asarray(x, np.int32) for x in xs]  # noqa: E731
  ex = CodiExamples(arr(qs), arr(cots), arr(answers), [0, 0, 0], [0, 1, 2], IDS)
  return ex, qs, cots, answers


def local_batch(ex, window=True):
  shapes = codi_batches.fit_shapes(ex, 4)
  if not window:
    shapes = codi_batches.Shapes(shapes.question, shapes.teacher, shapes.decoder, 0)
  rows = [cur.icot_example(e, shapes, IDS) for e in ex]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("keep_position", [False, True])
def test_icot_removal_on_a_literal_sequence(keep_position):
  ex, *_ = examples()
  cfg = codi_config(removal_smoothing_lambda=INF, keep_position=keep_position)
  cfg.remove_per_epoch, cfg.remove_all_when_remove_beyond = 1.0, 5.0  # one more token per step
  c = cur.Curriculum("icot_si", cfg, steps_per_epoch=1, pad_id=IDS.pad)
  local = local_batch(ex)
  L = local["teacher_ids"].shape[1]
  pad, ign = [IDS.pad] * L, [-100] * L

  batch = c.batch(local, step=3)  # scheduled 2: [2, 3, 4][20, 21, 22, 23][30, 31, eos]
  assert batch["teacher_ids"][0].tolist() == [2, 3, 4, 22, 23, 30, 31, 1] + pad[8:]
  assert batch["teacher_labels"][0].tolist() == [-100] * 3 + [22, 23, 30, 31, 1] + ign[8:]
  assert batch["teacher_mask"][0].tolist() == [True] * 8 + [False] * (L - 8)
  assert batch["teacher_ids"][1].tolist() == [5, 6, 32, 1] + pad[4:]  # a 1-token CoT: all gone
  want_pos = [0, 1, 2, 5, 6, 7, 8, 9] if keep_position else list(range(8))
  assert batch["teacher_positions"][0][:8].tolist() == want_pos
  assert set(batch) == {
    "teacher_ids",
    "teacher_labels",
    "teacher_mask",
    "teacher_positions",
    "teacher_label_pos",
  }
  np.testing.assert_array_equal(batch["teacher_label_pos"], local["teacher_label_pos"])

  batch = c.batch(local, step=6)  # scheduled 5 >= remove_all_when_remove_beyond: no CoT left
  assert batch["teacher_ids"][2].tolist() == [7, 8, 9, 10, 33, 34, 1] + pad[7:]
  assert batch["teacher_ids"][0].tolist() == [2, 3, 4, 30, 31, 1] + pad[6:]
  want_pos = [0, 1, 2, 7, 8, 9] if keep_position else list(range(6))
  assert batch["teacher_positions"][0][:6].tolist() == want_pos


def test_icot_offsets_are_drawn_per_row_and_reproducible():
  ex, *_ = examples()
  cfg = codi_config(removal_smoothing_lambda=0.01, remove_per_epoch=1.0)
  c = cur.Curriculum("icot_si", cfg, steps_per_epoch=1, pad_id=IDS.pad, seed=3)
  local = local_batch(ex)
  a, b = c.batch(local, step=1), c.batch(local, step=1)
  np.testing.assert_array_equal(a["teacher_ids"], b["teacher_ids"])  # a function of the step
  assert [int(m.sum()) for m in a["teacher_mask"]] != [10, 5, 13]  # offsets cut at scheduled 0
  # Draws per global row: a process holding rows 2..3 draws what a single process draws there.
  whole = cur.Curriculum("icot_si", cfg, seed=3, global_rows=4)
  part = cur.Curriculum("icot_si", cfg, seed=3, first_row=2, global_rows=4)
  u = whole.draws(5, 0, 4, 1)
  np.testing.assert_array_equal(part.draws(5, 0, 2, 1), u[:, 2:])
  assert not np.array_equal(whole.draws(5, 1, 4, 1), u)  # each micro-batch draws anew
  assert not np.array_equal(whole.draws(6, 0, 4, 1), u)


def plain_ce(backbone, rows):
  """Mean next-token CE over the labelled tokens of unpadded rows (ids, labels, positions)."""
  nll, count = 0.0, 0
  for ids, labels, pos in rows:
    out = backbone(jnp.asarray([ids]), positions=jnp.asarray([pos]))
    logits = np.asarray(out.logits[0], np.float64)
    for p in range(len(ids) - 1):
      if labels[p + 1] >= 0:
        row = logits[p]
        nll += np.log(np.exp(row - row.max()).sum()) + row.max() - row[labels[p + 1]]
        count += 1
  return nll / count


@pytest.mark.parametrize(
  "arch,keep_position,window", [("gpt2", False, True), ("llama", True, False)]
)
def test_icot_loss_equals_plain_ce_on_the_shortened_sequence(arch, keep_position, window):
  ex, qs, cots, answers = examples()
  cfg = codi_config(removal_smoothing_lambda=INF, keep_position=keep_position, remove_per_epoch=1.0)
  c = cur.Curriculum("icot_si", cfg, steps_per_epoch=1, pad_id=IDS.pad)
  step = 3  # 2 tokens removed from each CoT (all of a shorter one)
  batch = c.batch(local_batch(ex, window), step=step)
  assert ("teacher_label_pos" in batch) == window
  codi = Codi(transformer.build(mcfg.tiny(arch, vocab_size=V), seed=4), rngs=nnx.Rngs(0))
  loss, metrics = jax.jit(baselines.icot_loss, static_argnums=2)(
    codi, {k: jnp.asarray(v) for k, v in batch.items()}, CodiOptions(method="icot_si")
  )
  rows = []
  for q, cot, a in zip(qs, cots, answers):
    r = min(2, len(cot))
    ids = q + cot[r:] + a
    labels = [-100] * len(q) + cot[r:] + a
    pos = list(range(len(q))) + [len(q) + r + i for i in range(len(cot) - r + len(a))]
    rows.append((ids, labels, pos if keep_position else list(range(len(ids)))))
  np.testing.assert_allclose(float(loss), plain_ce(codi.backbone, rows), rtol=0, atol=2e-5)
  assert float(metrics["ce_teacher"]) == float(loss)


def test_icot_optimizer_restarts_when_the_removal_count_grows():
  cfg = codi_config(remove_per_epoch=2.0, remove_all_when_remove_beyond=3.0)
  c = cur.Curriculum("icot_si", cfg, steps_per_epoch=4, longest_cot=10)  # +1 every 2 steps
  assert [c.icot.scheduled(t) for t in range(1, 9)] == [0, 0, 1, 1, 2, 2, INF, INF]
  assert [t for t in range(1, 12) if c.reset_before(t)] == [3, 5, 7]
  # No restart once the schedule alone removed the longest CoT (the reference: the previous
  # batch had no CoT left).
  c = cur.Curriculum("icot_si", cfg, steps_per_epoch=4, longest_cot=1)
  assert [t for t in range(1, 12) if c.reset_before(t)] == [3]
  cfg.reset_optimizer = "epoch"
  c = cur.Curriculum("icot_si", cfg, steps_per_epoch=4, longest_cot=10)
  assert [t for t in range(1, 12) if c.reset_before(t)] == [5, 9]


def test_icot_optimizer_restart_is_a_fresh_adamw_on_the_global_lr_schedule():
  config = base.get_config()
  config.optim.grad_accum = 2
  tx, _ = train_step.make_optimizer(config.optim, num_steps=50)
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(6):
    _, state = tx.update(grads, state, params)
  fresh = train_step.restart_optimizer(tx, state, params)
  adam = [x for x in jax.tree.leaves(fresh.inner_opt_state, is_leaf=_adam) if _adam(x)]
  sched = [x for x in jax.tree.leaves(fresh.inner_opt_state, is_leaf=_sched) if _sched(x)]
  assert len(adam) == 1 and int(adam[0].count) == 0
  assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves((adam[0].mu, adam[0].nu)))
  assert len(sched) == 1 and int(sched[0].count) == 3  # 6 micro-steps = 3 updates, kept
  assert int(fresh.gradient_step) == 3
  jitted = train_step.make_restart(tx)(state, params)
  assert jax.tree.structure(jitted) == jax.tree.structure(fresh)


def _adam(x):
  return isinstance(x, optax.ScaleByAdamState)


def _sched(x):
  return isinstance(x, optax.ScaleByScheduleState)


def _run_config():
  c = tiny_codi.get_config("icot_si")
  c.codi.remove_per_epoch = 25.0  # 200 examples / 8 per batch = 25 steps: one token per step
  c.optim.num_steps = 3
  c.eval.every_steps, c.eval.num_examples, c.eval.max_new_tokens = 3, 4, 4
  c.checkpoint.every_steps, c.checkpoint.keep = 1, 5
  return c


def test_icot_training_compiles_once_and_resumes_on_schedule(tmp_path):
  ref = tmp_path / "ref"
  summary = train_lib.train_and_evaluate(_run_config(), str(ref))
  assert summary["step_compiles"] == 1
  lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
  assert [x["icot/scheduled_to_remove"] for x in lines if "loss" in x] == [0, 1, 2]
  assert "valid/teacher_acc" in lines[-1] and "valid/student_acc" not in lines[-1]
  run = tmp_path / "run"
  shutil.copytree(ref, run)
  for d in ("final", "checkpoints/2", "checkpoints/3"):
    shutil.rmtree(run / d)
  summary = train_lib.train_and_evaluate(_run_config(), str(run))
  assert summary["resumed_from"] == 1 and summary["step_compiles"] == 1
  want, got = tiny_codi.final_params(ref), tiny_codi.final_params(run)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
