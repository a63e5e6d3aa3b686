"""The pretrained-LoRA regime (experiments/pretrained_lora.py): a base trained and exported, an arm
fine-tuned from it with LoRA leaves every base weight bit-identical and trains only LoRA and the
projection; the arms' configs, the run order and the verdict rule."""

import os
import sys

import jax
import numpy as np
import pytest
import tiny_codi
import tiny_hf
from flax import nnx

from codi_jax import final, sharding, train_lib, train_state
from codi_jax.codi import build
from codi_jax.models import hf, weights_io

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))

import pretrained_lora as pl  # noqa: E402

SEED = 11


def arm(name, out, rank=4):
  """Arm `name` of the tiny config on the base in `out` (LoRA rank cut to the tiny width)."""
  c = pl.arm_config(tiny_codi.get_config(), name, SEED, str(out))
  c.optim.num_steps, c.eval.every_steps, c.checkpoint.every_steps = 3, 3, 3
  if c.model.lora_rank:
    c.model.lora_rank, c.model.lora_dropout = rank, 0.0
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(out, LoRA CODI run dir): a base (a finished CoT-SFT run from scratch, untrained weights:
  what the test needs is any saved base), exported, and a 3-step CODI run with LoRA on it."""
  out = tmp_path_factory.mktemp("pl")
  tiny_codi.write_finished(pl.workdir_of(str(out), "base", SEED), tiny_codi.get_config("cot_sft"))
  pl.ensure_export(pl.workdir_of(str(out), "base", SEED), pl.export_dir(str(out), "base", SEED))
  run = pl.workdir_of(str(out), "codi", SEED)
  train_lib.train_and_evaluate(arm("codi", out), run)
  return out, run


def test_lora_run_leaves_the_base_bit_identical(runs):
  out, run = runs
  saved = weights_io.read_hf_weights(pl.export_dir(str(out), "base", SEED))
  trained = final.load_final(run).codi
  cfg = trained.backbone.cfg
  frozen = {
    hf.full_name(k, cfg.arch): v
    for k, v in hf.export_tensors(trained.backbone, merge_lora=False).items()
  }
  assert set(frozen) == set(saved)
  for name, want in saved.items():  # the embedding too: its pad/bot/eot rows are the base's
    np.testing.assert_array_equal(frozen[name], want, err_msg=name)
  # The run did train: the adapters (B starts at 0) and the projection moved.
  params = nnx.to_flat_state(nnx.state(trained, nnx.Param))
  lora_b = [np.asarray(v.get_value()) for p, v in params if p[-1] == "lora_b"]
  assert lora_b and all(np.abs(b).sum() > 0 for b in lora_b)
  fresh, _, _ = build.build_model(arm("codi", out), None)
  # One vocabulary: the arm tokenizes the 3-step task as its base does.
  text = "Tom has 7 coins, loses 2. Gets 5 times as many. How many now?<<7-2=5>>The answer is: 25"
  base_tok = final.load_final(pl.workdir_of(str(out), "base", SEED)).tokenizer
  assert final.load_final(run).tokenizer.encode(text) == base_tok.encode(text)
  w1 = np.asarray(fresh.prj.w1.get_value())
  assert not np.array_equal(np.asarray(trained.prj.w1.get_value()), w1)


def test_an_export_keeps_its_special_rows(runs):
  """The base export's tokenizer holds [PAD]/<bot>/<eot> at its table's last rows: an arm on it
  reuses them (the base run's ids, no new rows, their trained values, also as the trainable copy
  of train_special_embeddings); the run's saved ids are the same."""
  out, run = runs
  base = final.load_final(pl.workdir_of(str(out), "base", SEED))
  config = arm("codi", out)
  config.codi.train_special_embeddings = True
  codi, tok, special = build.build_model(config, None)
  assert special == base.special == final.load_final(run).special
  assert [tok.token_to_id(t) for t in build.SPECIAL_TOKENS] == [
    special.pad,
    special.bot,
    special.eot,
  ]
  table = np.asarray(base.codi.backbone.embed.embedding.get_value())
  assert codi.backbone.cfg.vocab_size == special.eot + 1 == table.shape[0]
  np.testing.assert_array_equal(codi.backbone.embed.embedding.get_value(), table)
  np.testing.assert_array_equal(codi.backbone.embed.special.get_value(), table[-3:])


def test_a_base_without_special_tokens_grows_its_table(tmp_path):
  """A pretrained model whose tokenizer lacks them (as GPT-2, Llama): 3 fresh rows appended after
  its table (mean-resized), the pretrained rows untouched, the embedding frozen under LoRA."""
  spec = tiny_hf.write(str(tmp_path / "llama"))
  config = arm("codi", tmp_path)
  config.model.spec = spec
  codi, tok, special = build.build_model(config, None)
  V = tiny_hf.V
  assert [special.pad, special.bot, special.eot] == [V, V + 1, V + 2] and tok.token_to_id(
    "<bot>"
  ) == V + 1
  table = np.asarray(codi.backbone.embed.embedding.get_value())
  saved = weights_io.read_hf_weights(spec)["model.embed_tokens.weight"]
  assert table.shape == (V + 3, saved.shape[1])
  np.testing.assert_array_equal(table[:V], saved)
  assert np.all(np.isfinite(table[V:])) and not np.array_equal(table[V], table[V + 1])
  frozen = [p for p, _ in nnx.to_flat_state(split(codi, config).frozen)]
  assert ("backbone", "embed", "embedding") in frozen


def test_only_lora_and_the_projection_train(runs):
  out, _ = runs
  config = arm("codi", out)
  codi, _, _ = build.build_model(config, None)
  s = split(codi, config)
  trained = [p for p, _ in nnx.to_flat_state(s.train_state)]
  frozen = [p for p, _ in nnx.to_flat_state(s.frozen)]
  assert trained and all(p[-1] in ("lora_a", "lora_b") or p[0] == "prj" for p in trained)
  assert any(p[0] == "prj" for p in trained)
  # Every base weight (embedding, norms, attention, MLP) is in the frozen part, none trains.
  base_paths = [p for p, _ in nnx.to_flat_state(nnx.state(codi.backbone, nnx.Param))]
  base_paths = [("backbone", *p) for p in base_paths if p[-1] not in ("lora_a", "lora_b")]
  assert base_paths and set(base_paths) <= set(frozen)
  # The full-weight arm on the same base trains everything.
  full = arm("icot_si", out)
  s_full = split(build.build_model(full, None)[0], full)
  assert not jax.tree.leaves(s_full.frozen)


def split(codi, config):
  """What the trainer differentiates (train_state) and passes through (frozen)."""
  with sharding.use_mesh(sharding.make_mesh(config.mesh), config.logical_axis_rules):
    return train_state.split(codi, config, 3)


def test_arm_configs():
  scratch = tiny_codi.get_config()
  for name, a in pl.ARMS.items():
    c = pl.arm_config(scratch, name, SEED, "/o")
    assert c.data.include_last_cot is False and c.tokenizer == "model" and c.seed == SEED
    assert c.model.spec == f"/o/{a.init}_s{SEED}_hf"
    assert c.model.lora_rank == (pl.LORA["lora_rank"] if a.lora else 0)
    if a.lora:
      assert c.model.lora_alpha == pl.LORA["lora_alpha"]
  coconut = pl.arm_config(scratch, "coconut", SEED, "/o")
  assert coconut.model.spec == f"/o/cot_sft_s{SEED}_hf" and coconut.codi.coconut_start_stage == 1
  assert pl.arm_config(scratch, "icot_si", SEED, "/o").codi.coconut_start_stage == 0
  betas = [pl.arm_config(scratch, n, SEED, "/o").codi.beta for n in pl.CODI_ARMS]
  assert betas == [1.0, 0.3, 0.0]


def test_run_order():
  deps = pl.tasks_of(["codi", "coconut"], [11, 12])
  assert deps[("coconut", 11)] == [("base", 11), ("cot_sft", 11)]
  assert deps[("codi", 12)] == [("base", 12)] and deps[("base", 12)] == []
  order = sorted(deps, key=lambda t: -pl._priority(t, deps))  # pylint: disable=protected-access
  assert [t[0] for t in order[:2]] == ["base", "base"] and order[2][0] == "cot_sft"


def rows_of(accs: dict, valid: dict, teacher=None):
  return {
    n: [
      {"seed": s, "accuracy": a, "valid": {"valid/student_acc": valid.get(n, 0.0)}}
      | ({"teacher_accuracy": teacher[n]} if teacher and n in teacher else {})
      for s, a in zip((11, 12, 13), v)
    ]
    for n, v in accs.items()
  }


def test_verdict_rule():
  cot = [0.95, 0.96, 0.97]
  good = rows_of(
    {"cot_sft": cot, "codi": [0.90, 0.91, 0.92], "codi_no_distill": [0.80, 0.8, 0.8]},
    {"codi": 0.9},
  )
  assert "**reproduces**" in pl.verdict(good)
  tie = rows_of(
    {
      "cot_sft": cot,
      "codi": [0.5, 0.6, 0.7],
      "codi_beta0.3": [0.2, 0.2, 0.2],
      "codi_no_distill": [0.5, 0.61, 0.6],
    },
    {"codi": 0.6, "codi_beta0.3": 0.2},
  )
  assert pl.choose_beta(tie) == "codi" and "**refutes**" in pl.verdict(tie)
  teacher = rows_of(
    {"cot_sft": cot, "codi": [0.7, 0.7, 0.7], "codi_no_distill": [0.6, 0.6, 0.6]},
    {"codi": 0.7},
    {"codi": 0.5, "codi_no_distill": 0.9},
  )
  assert "**refutes**" in pl.verdict(teacher)
  between = rows_of(
    {"cot_sft": cot, "codi": [0.7, 0.7, 0.7], "codi_no_distill": [0.6, 0.6, 0.6]}, {"codi": 0.7}
  )
  assert "**inconclusive**" in pl.verdict(between)
