"""The config schema: every field has a rule, shipped configs pass, bad values are one line naming
the field, the value and what is allowed; the cross-field rules."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import cli_util
import ml_collections
import pytest
import tiny_codi

from codi_jax import config_rules
from codi_jax import train_options as cs
from codi_jax.errors import InputError
from codi_jax.eval_lib import Options
from codi_jax.options import rules
from configs import base, demo, gpt2, llama1b
from soft_jax import cli_common
from soft_jax.sampling import SamplerParams

EVAL = rules(Options)  # codi_jax.evaluate flags


def leaves(tree, prefix="") -> set[str]:
  out = set()
  for key, value in tree.items():
    if isinstance(value, dict | ml_collections.ConfigDict):
      out |= leaves(value, f"{prefix}{key}.")
    else:
      out.add(f"{prefix}{key}")
  return out


def error(fn, *args, **kwargs) -> str:
  with pytest.raises(InputError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def validate(config, devices=1, processes=1):
  cs.validate_train(config, devices=devices, processes=processes)


# ---------------------------------------------------------------------------------------------
# Coverage: a field cannot be added without a rule


def test_every_field_of_base_has_a_rule_and_every_rule_a_field():
  fields = leaves(base.get_config())
  assert sorted(fields - set(cs.TRAIN)) == [], "config fields without a rule in train_options.TRAIN"
  assert sorted(set(cs.TRAIN) - fields) == [], "rules for fields configs/base.py does not have"


def test_every_sampler_and_evaluate_field_has_a_rule():
  assert set(cli_common.SAMPLER) == {f.name for f in dataclasses.fields(SamplerParams)}
  assert set(EVAL) == {f.name for f in dataclasses.fields(Options)}


def test_every_soft_cli_flag_has_a_rule():
  """Each soft CLI's own flags (not absl's) are in soft_flag_rules; checked in a subprocess, as
  defining them here would clash with other tests' flags."""
  code = (
    "import json, sys\n"
    "from absl import flags\n"
    "import importlib\n"
    "m = importlib.import_module(sys.argv[1])\n"
    "before = set(flags.FLAGS)\n"
    "m._define_flags()\n"
    "print(json.dumps(sorted(set(flags.FLAGS) - before)))\n"
  )
  rules = set(cli_common.soft_flag_rules())
  for prog in ("soft_jax.generate", "soft_jax.evaluate"):
    proc = subprocess.run(
      [sys.executable, "-c", code, prog], cwd=cli_util.REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    defined = set(json.loads(proc.stdout.splitlines()[-1]))
    assert defined and sorted(defined - rules) == [], prog


def test_every_preset_field_has_a_rule():
  from configs.soft import VARIANTS, preset  # pylint: disable=import-outside-toplevel

  for variant in VARIANTS:
    assert sorted(leaves(preset(variant, model="m")) - set(cli_common.SOFT)) == [], variant


def test_rules_describe_themselves_and_enums_resolve():
  for table in (cs.TRAIN, EVAL, cli_common.SAMPLER, cli_common.SOFT, cli_common.soft_flag_rules()):
    for path, rule in table.items():
      assert rule.allowed(), path
      if rule.kind == "enum":
        assert rule.options(), path


# ---------------------------------------------------------------------------------------------
# Shipped configs


@pytest.mark.parametrize(
  "config",
  [
    demo.get_config(),
    *(gpt2.get_config(v) for v in (None, "nl", "commonsense", "ours", "nl,ours")),
    *(llama1b.get_config(v) for v in (None, "nl", "commonsense", "ours")),
    tiny_codi.get_config(),
    *(tiny_codi.get_config(m) for m in ("cot_sft", "no_cot_sft", "coconut", "icot_si")),
  ],
)
def test_shipped_configs_validate(config):
  validate(config)


@pytest.mark.parametrize("model", ["smollm2", "deepseek_r1_qwen", "qwq", "llama"])
@pytest.mark.parametrize("variant", ["soft", "dirichlet", "gumbel,math500", "sample", "greedy"])
def test_soft_presets_validate(model, variant):
  from soft_jax import cli_common  # pylint: disable=import-outside-toplevel

  spec = f"configs/soft/{model}.py:{variant}"
  cli_common.check_preset(cli_common.load_config(spec), spec)


# ---------------------------------------------------------------------------------------------
# One line naming the field, the value and what is allowed


@pytest.mark.parametrize(
  "path, value, needle",
  [
    ("data.batch_size", 0, "expected an integer >= 1"),
    ("optim.lr", -1.0, "expected a number > 0"),
    ("codi.num_latent", -3, "expected an integer >= 0"),
    ("codi.num_latent_infer", -2, "expected an integer >= -1"),
    ("codi.coconut_start_stage", -1, "expected an integer >= 0"),
    ("optim.warmup_ratio", 1.0, "in [0, 1)"),
    ("model.dropout", 1.0, "in [0, 1)"),
    ("model.lora_dropout", -0.1, "in [0, 1)"),
    ("codi.prj_dropout", 1.5, "in [0, 1)"),
    ("eval.batch_size", 0, ">= 1"),
    ("eval.every_steps", 0, ">= 1"),
    ("checkpoint.keep", 0, ">= 1"),
    ("checkpoint.best_mode", "biggest", "one of max, min"),
    ("codi.method", "cot", "one of codi, cot_sft, no_cot_sft, coconut, icot_si"),
    ("codi.padding_mode", "none", "one of masked, official, official_fixmask"),
    ("codi.distill_loss", "mse", "one of smooth_l1, l1, l2"),
    ("data.source", "gsm8k", "one of synthetic, multiplication"),
    ("data.format", "csv", "one of jsonl, tfds"),
    ("model.lora_rank", -1, ">= 0"),
    ("model.lora_alpha", 0.0, "> 0"),
    ("mesh.data", 0, "-1 (the remaining devices) or an integer >= 1"),
    ("optim.num_steps", 1, "0 (use epochs) or an integer >= 2"),
    ("tokenizer", "train_bpe:10", "train_bpe:<vocab >= 257>"),
    ("tokenizer", "train_bpe:300:words", "train_bpe:<vocab >= 257>[:numbers]"),
    ("data.synthetic.ops", ("+", "^"), "one of +, -, *, /"),
    ("data.synthetic.ops", (), "a non-empty list"),
    ("optim.lr", float("nan"), "a number > 0"),
    ("codi.alpha", float("inf"), "a number >= 0"),
    ("optim.lr", "3e-3", "a number > 0"),
    ("data.batch_size", 8.0, "an integer"),
    ("data.batch_size", True, "an integer"),
    ("overwrite", 1, "True or False"),
    ("seed", -1, "[0, "),
  ],
)
def test_bad_field(path, value, needle):
  config = tiny_codi.get_config().to_dict()
  group, _, key = path.rpartition(".")
  (config_rules.at_path(config, group) if group else config)[key] = value
  message = error(validate, config)
  assert message.startswith(f"--config.{path}: got {value!r}; expected "), message
  assert needle in message


def test_inf_allowed_where_declared():
  config = tiny_codi.get_config()
  config.codi.removal_smoothing_lambda = float("inf")
  config.codi.remove_all_when_remove_beyond = float("inf")
  validate(config)


def test_unknown_key_is_an_error_with_a_suggestion():
  config = tiny_codi.get_config()
  config.optim.lrr = 1e-3
  assert error(validate, config) == "--config.optim.lrr: unknown field (did you mean optim.lr?)"
  config = tiny_codi.get_config()
  config.zzz = 1
  assert error(validate, config).startswith("--config.zzz: unknown field; known here: checkpoint")


def test_missing_key_and_non_group():
  config = tiny_codi.get_config().to_dict()
  del config["optim"]["clip"]
  assert error(validate, config).startswith("--config.optim.clip: missing (expected a number > 0")
  config = tiny_codi.get_config().to_dict()
  config["optim"] = 3
  assert error(validate, config).startswith("--config.optim: got 3; expected a group of fields (b1")


# ---------------------------------------------------------------------------------------------
# Cross-field rules


def mutate(**changes):
  config = tiny_codi.get_config()
  for path, value in changes.items():
    group, _, key = path.replace("__", ".").rpartition(".")
    (config_rules.at_path(config, group) if group else config)[key] = value
  return config


@pytest.mark.parametrize(
  "changes, devices, processes, field, needle",
  [
    ({"data__batch_size": 6}, 4, 1, "data.batch_size", "multiple of the 4 data-parallel devices"),
    ({"data__batch_size": 8}, 1, 3, "data.batch_size", "of the 3 processes"),
    ({"mesh__data": 3}, 4, 1, "mesh", "using all 4 devices"),
    ({"mesh__data": -1, "mesh__fsdp": -1}, 4, 1, "mesh", "at most one of them -1"),
    ({"optim__num_steps": 0, "optim__epochs": 0.0}, 1, 1, "optim.epochs", "> 0 when"),
    ({"model__num_heads": 3}, 1, 1, "model.num_heads", "a divisor of model.d_model=32"),
    ({"model__num_kv_heads": 3}, 1, 1, "model.num_kv_heads", "divisor of model.num_heads=2"),
    ({"model__num_kv_heads": 1}, 1, 1, "model.num_kv_heads", "no grouped-query attention"),
    ({"model__arch": "llama", "model__d_model": 30}, 1, 1, "model.num_heads", "even head size"),
    ({"tokenizer": "model"}, 1, 1, "tokenizer", "from scratch"),
    ({"model__vocab_size": 100}, 1, 1, "model.vocab_size", ">= 300"),
    ({"eval__max_new_tokens": 252}, 1, 1, "eval.max_new_tokens", "model.max_positions=256"),
    (
      {"codi__method": "cot_sft", "codi__num_latent_infer": 3},
      1,
      1,
      "codi.num_latent_infer",
      "without continuous thoughts",
    ),
    (
      {"codi__method": "coconut", "codi__stage_steps": 0, "codi__epochs_per_stage": 0},
      1,
      1,
      "codi.stage_steps",
      ">= 1",
    ),
    ({"codi__coconut_start_stage": 4}, 1, 1, "codi.coconut_start_stage", "max_latent_stage=3"),
    ({"data__synthetic__min_steps": 4}, 1, 1, "data.synthetic.min_steps", "<= max_steps=3"),
    ({"data__synthetic__max_operand": 40}, 1, 1, "data.synthetic.max_operand", "max_value=30"),
    (
      {"data__source": "multiplication", "data__multiplication__digits": 1},
      1,
      1,
      "data.multiplication.train",
      "<= 81",
    ),
    ({"data__format": "tfds"}, 1, 1, "data.source", "gsm8k-aug or gsm8k-aug-nl"),
    (
      {"data__format": "tfds", "data__source": "gsm8k-aug", "data__tfds_data_dir": "gs://b/x"},
      1,
      1,
      "data.tfds_data_dir",
      "no URL",
    ),
    (
      {"codi__method": "no_cot_sft", "checkpoint__best_metric": "valid/teacher_acc"},
      1,
      1,
      "checkpoint.best_metric",
      "'valid/student_acc'",
    ),
  ],
)
def test_cross_field_rules(changes, devices, processes, field, needle):
  message = error(validate, mutate(**changes), devices=devices, processes=processes)
  assert message.startswith(f"--config.{field}: got "), message
  assert needle in message, message


def test_cross_rules_pass_at_their_boundaries():
  validate(mutate(data__batch_size=8), devices=8)
  validate(mutate(mesh__data=2, mesh__fsdp=-1), devices=8)
  validate(mutate(eval__max_new_tokens=251))  # 256 - 2 thoughts - 3
  validate(mutate(codi__method="cot_sft", codi__num_latent_infer=0))
  validate(mutate(model__vocab_size=300))
  validate(mutate(data__source="multiplication", data__multiplication__digits=3))
  validate(mutate(optim__num_steps=0, optim__epochs=0.01))


def test_evaluate_override_checks_only_what_it_replaces():
  config = mutate(optim__lr=-1.0, data__synthetic__min_steps=9)  # optim is not replaced
  message = error(cs.validate_train, config, sections=("data", "eval", "seed"))
  assert message.startswith("--config.data.synthetic.min_steps: got 9")
  cs.validate_train(mutate(optim__lr=-1.0), sections=("data", "eval", "seed"))


# ---------------------------------------------------------------------------------------------
# The other entry points' rules


@pytest.mark.parametrize(
  "changes, needle",
  [
    ({"batch_size": 0}, "--batch_size: got 0; expected an integer >= 1 (or None)"),
    ({"max_new_tokens": -5}, "--max_new_tokens: got -5"),
    ({"num_latent": -1}, "--num_latent: got -1; expected an integer >= 0"),
    ({"padding_mode": "x"}, "--padding_mode: got 'x'; expected one of masked"),
    ({"probe_topk": 0}, "--probe_topk: got 0"),
    ({"limit": 0}, "--limit: got 0"),
    ({"latency_calls": 0}, "--latency_calls: got 0"),
    ({"mode": "both2"}, "--mode: got 'both2'"),
  ],
)
def test_evaluate_options(tmp_path, changes, needle):
  message = error(Options(workdir=str(tmp_path), **changes).check)
  assert message.startswith(needle), message


def test_sampler_params_use_the_schema():
  assert error(SamplerParams(top_p=0.0).validate, prefix="--") == (
    "--top_p: got 0.0; expected a number in (0, 1]"
  )
  assert error(SamplerParams(cold_stop_patience=2**31).validate).startswith("cold_stop_patience:")


def test_soft_preset_fields(tmp_path):
  from soft_jax import cli_common  # pylint: disable=import-outside-toplevel

  path = tmp_path / "p.py"
  path.write_text(
    "from configs.soft import preset\n"
    "def get_config(arg=None):\n"
    "  c = preset(arg, model='smollm2')\n"
    "  c.sampler.top_p = 2.0\n"
    "  return c\n"
  )
  spec = str(path)
  message = error(cli_common.check_preset, cli_common.load_config(spec), spec)
  assert message == f"--config={spec}: sampler.top_p: got 2.0; expected a number in (0, 1]"
  path.write_text(
    "from configs.soft import preset\n"
    "def get_config(arg=None):\n"
    "  c = preset(arg, model='smollm2')\n"
    "  c.max_new_token = 5\n"
    "  return c\n"
  )
  message = error(cli_common.check_preset, cli_common.load_config(spec), spec)
  assert message == f"--config={spec}: max_new_token: unknown field (did you mean max_new_tokens?)"


def test_float32_rounding_is_named_only_when_it_is_the_reason():
  """1e-300 is > 0 as given but 0.0 on the device: the message says so; -1 needs no such note."""
  msg = error(SamplerParams(top_p=1e-300).validate, prefix="--")
  assert msg.endswith("expected a number in (0, 1] (as float32 the device sees 0.0)"), msg
  assert error(SamplerParams(top_p=-1.0).validate, prefix="--").endswith("in (0, 1]")
