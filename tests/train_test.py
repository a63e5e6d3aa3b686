"""A tiny CODI training run end to end: one step compile, metrics, final save, workdir safety."""

import json
import os
import subprocess
import sys

import pytest

from codi_jax import train_lib
from codi_jax.errors import InputError
from configs import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(method="codi"):
  c = demo.get_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.d_ff = 2, 32, 2, 64
  c.tokenizer = "train_bpe:300"
  c.data.synthetic.train, c.data.synthetic.valid = 200, 24
  c.data.batch_size = 8
  c.codi.num_latent = 2
  c.codi.method = method
  c.optim.num_steps = 6
  c.eval.every_steps = 3
  c.eval.batch_size = 16
  c.eval.max_new_tokens = 6
  c.log_every = 1
  return c


@pytest.mark.parametrize("method", ["codi", "cot_sft", "no_cot_sft"])
def test_tiny_run_compiles_step_once_and_saves(tmp_path, method):
  summary = train_lib.train_and_evaluate(tiny_config(method), str(tmp_path))
  assert summary["step_compiles"] == 1  # 6 steps, 2 evaluations: the train step traced once
  assert os.path.isfile(tmp_path / "final" / "run.json")
  assert os.path.isfile(tmp_path / "final" / "tokenizer.json")
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl", encoding="utf-8")]
  train_lines = [x for x in lines if "loss" in x]
  assert [x["step"] for x in train_lines] == [1, 2, 3, 4, 5, 6]
  want = {"codi": ("ce_student", "ce_teacher", "distill"), "cot_sft": ("ce_teacher",),
          "no_cot_sft": ("ce_student",)}[method]
  assert all(k in train_lines[0] for k in want)
  evals = [x for x in lines if any(k.startswith("valid/") for k in x)]
  assert [x["step"] for x in evals] == [3, 6]
  if method != "cot_sft":
    assert "valid/student_acc" in evals[-1]
  if method != "no_cot_sft":
    assert "valid/teacher_acc" in evals[-1]


def test_finished_workdir_is_not_overwritten(tmp_path):
  os.makedirs(tmp_path / "final")
  (tmp_path / "final" / "run.json").write_text("{}")
  with pytest.raises(InputError, match="already holds a finished run"):
    train_lib.train_and_evaluate(tiny_config(), str(tmp_path))
  assert (tmp_path / "final" / "run.json").read_text() == "{}"


def test_unknown_config_key_is_a_clear_error(tmp_path):
  r = subprocess.run([sys.executable, "-m", "codi_jax.train", "--config=configs/demo.py",
                      "--config.optim.no_such_key=1", f"--workdir={tmp_path}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode != 0
  assert "no_such_key" in r.stderr and "Traceback" not in r.stderr
  assert not os.listdir(tmp_path)
