"""A tiny CODI training run end to end: one step compile, metrics, final save, workdir safety."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tiny_codi
from flax import nnx

from codi_jax import final, train_lib
from codi_jax.codi import build
from codi_jax.data import sources
from codi_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(method="codi"):
  return tiny_codi.get_config(method)


@pytest.mark.parametrize("method", ["codi", "cot_sft", "no_cot_sft"])
def test_tiny_run_compiles_step_once_and_saves(tmp_path, method):
  summary = train_lib.train_and_evaluate(tiny_config(method), str(tmp_path))
  assert summary["step_compiles"] == 1  # 6 steps, 2 evaluations: the train step traced once
  assert os.path.isfile(tmp_path / "final" / "run.json")
  assert os.path.isfile(tmp_path / "final" / "tokenizer.json")
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_lines = [x for x in lines if "loss" in x]
  assert [x["step"] for x in train_lines] == [1, 2, 3, 4, 5, 6]
  want = {
    "codi": ("ce_student", "ce_teacher", "distill"),
    "cot_sft": ("ce_teacher",),
    "no_cot_sft": ("ce_student",),
  }[method]
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
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "codi_jax.train",
      "--config=configs/demo.py",
      "--config.optim.no_such_key=1",
      f"--workdir={tmp_path}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert r.returncode != 0
  assert "no_such_key" in r.stderr and "Traceback" not in r.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.slow  # ~1 minute of XLA compiles for the bf16 LoRA step
def test_lora_bf16_run_trains_only_adapters_and_prj(tmp_path):
  """LoRA on a loaded HF model with bf16 compute: one compile, finite losses, the base untouched."""
  transformers = pytest.importorskip("transformers")
  import tokenizers  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  hf_dir = tmp_path / "hf"
  hf_cfg = transformers.GPT2Config(vocab_size=400, n_positions=256, n_embd=32, n_layer=2, n_head=2)
  transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(hf_dir)
  backend = tokenizers.Tokenizer(
    tokenizers.models.WordLevel({"<eos>": 0, "<unk>": 1}, unk_token="<unk>")
  )
  backend.save(str(hf_dir / "tokenizer.json"))
  (hf_dir / "tokenizer_config.json").write_text(
    json.dumps({"eos_token": "<eos>", "unk_token": "<unk>"})
  )

  c = tiny_config()
  c.model.spec = str(hf_dir)
  c.model.lora_rank, c.model.lora_alpha, c.model.lora_dropout = 4, 8.0, 0.0
  c.model.dtype = "bfloat16"
  summary = train_lib.train_and_evaluate(c, str(tmp_path / "run"))
  assert summary["step_compiles"] == 1
  lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(x["loss"]) for x in lines if "loss" in x)

  params = nnx.to_pure_dict(nnx.state(final.load_final(str(tmp_path / "run")).codi, nnx.Param))
  wte = load_file(str(hf_dir / "model.safetensors"))["transformer.wte.weight"]
  np.testing.assert_array_equal(np.asarray(params["backbone"]["embed"]["embedding"])[:400], wte)
  lora_b = [
    np.asarray(v) for p, v in nnx.traversals.flatten_mapping(params).items() if p[-1] == "lora_b"
  ]
  assert lora_b and any(np.abs(b).sum() > 0 for b in lora_b)  # adapters moved (B starts at 0)


def test_sharded_init_equals_eager_build():
  """init_model (eval_shape + jitted, sharded init) gives build_model's parameters and ids."""
  from codi_jax import sharding  # pylint: disable=import-outside-toplevel

  c = tiny_config()
  recs, _, _ = sources.load_records(c)
  eager, _, ids_a = build.build_model(c, build.build_tokenizer(c, recs))
  with sharding.use_mesh(sharding.make_mesh(c.mesh), c.logical_axis_rules):
    sharded, _, ids_b = build.init_model(c, build.build_tokenizer(c, recs))
  assert ids_a == ids_b
  a = dict(nnx.to_flat_state(nnx.state(eager, nnx.Param)))
  b = dict(nnx.to_flat_state(nnx.state(sharded, nnx.Param)))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(
      np.asarray(b[k].get_value()), np.asarray(a[k].get_value()), rtol=0, atol=1e-7, err_msg=str(k)
    )
