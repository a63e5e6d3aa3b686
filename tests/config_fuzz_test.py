"""Property-based fuzz of every config field and flag of codi_jax.train, codi_jax.evaluate,
soft_jax.generate and soft_jax.evaluate: out-of-range, wrong-type and boundary values.

Each case either validates, and then every fuzzed value is one this file (independently of the
schema) considers sensible, or it is refused with exactly one line naming a field. The validation
passes run in-process (seeded: `derandomize`, bounded: `max_examples`); a few sampled valid cases
then run the real CLIs in subprocesses for 2 steps / a couple of tokens on tiny models.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random

import cli_util
import ml_collections
import pytest
import tiny_codi
import tiny_hf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codi_jax import config_cross, config_rules
from codi_jax import train_options as cs
from codi_jax.errors import InputError
from codi_jax.eval_lib import Options
from codi_jax.options import rules
from soft_jax import cli_common
from soft_jax import evaluate as soft_evaluate

FUZZ = settings(
  max_examples=250,
  deadline=None,  # the first example imports modules lazily; the budget is max_examples
  derandomize=True,  # seeded: the same examples every run
  database=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
INF = math.inf
WRONG = [None, "", "x", "1", "nan", [], [1], {}, {"a": 1}, True, False, 0, 1, -1, 2**40, -(2**40)]
WRONG += [0.5, -0.5, 1.5, 1e-300, 1e308, math.nan, INF, -INF]

EVAL = rules(Options)  # codi_jax.evaluate flags


# ---------------------------------------------------------------------------------------------
# Values


def boundary_values(rule: config_rules.Rule) -> list:
  """Values at and just past a rule's bounds and choices."""
  out = []
  if rule.kind in ("int", "num"):
    for b in (rule.lo, rule.hi):
      if b is None or b == INF:
        continue
      if rule.kind == "int":
        out += [b - 1, b, b + 1]
      else:
        out += [b, float(b), math.nextafter(b, INF), math.nextafter(b, -INF), b - 1.0, b + 1.0]
  elif rule.kind == "enum":
    opts = list(rule.options())
    out += opts + [str(o).upper() + "_" for o in opts] + ["bogus", ""]
  elif rule.kind == "seq":
    out += [(), [""], ["+", "^"], ("+",), ("+", "-", "*", "/"), [1, 2]]
  elif rule.kind == "custom":
    out += [-2, -1, 0, 1, 2, 3, "model", "gpt2", "train_bpe", "train_bpe:256", "train_bpe:257"]
    out += ["train_bpe:", "train_bpe:x", "1,1,1", "-1,1,1", "1,1", "0,1,1", "-1,-1,1", "a,b,c"]
    out += [(("batch", ("data",)),), (("batch", ("nope",)),), ((1, 2, 3),)]
  return out


def values_for(rule: config_rules.Rule):
  kinds = {
    "int": st.integers(-3, 10**6),
    "num": st.floats(allow_nan=True, allow_infinity=True),
    "bool": st.booleans(),
    "str": st.text(max_size=6),
    "enum": st.text(max_size=8),
    "seq": st.lists(st.sampled_from(["+", "-", "*", "/", "^", ""]), max_size=5),
    "custom": st.one_of(st.integers(-3, 8), st.text(max_size=6)),
  }
  edges = boundary_values(rule)
  return st.one_of(
    st.sampled_from(WRONG), st.sampled_from(edges) if edges else st.nothing(), kinds[rule.kind]
  )


def mutation(rules: dict):
  return st.sampled_from(sorted(rules)).flatmap(
    lambda path: st.tuples(st.just(path), values_for(rules[path]))
  )


def assign(tree, path: str, value):
  group, _, key = path.rpartition(".")
  node = tree
  for part in group.split(".") if group else ():
    node = node[part]
  node[key] = value


def one_line(e: InputError) -> str:
  message = str(e)
  assert message and "\n" not in message and "Traceback" not in message
  return message


# ---------------------------------------------------------------------------------------------
# An independent oracle: what must never validate (from the issue, not from the schema)

_POS_INT = "data.batch_size eval.batch_size eval.every_steps eval.max_new_tokens log_every "
_POS_INT += "optim.grad_accum checkpoint.keep data.buckets data.max_token_num data.valid_size "
_POS_INT += "model.num_layers model.d_model model.num_heads model.d_ff model.max_positions "
_POS_INT += "codi.c_thought data.synthetic.train data.synthetic.valid data.multiplication.digits"
_NONNEG_INT = "codi.num_latent model.lora_rank model.vocab_size model.num_kv_heads seed "
_NONNEG_INT += "eval.num_examples checkpoint.every_steps codi.stage_steps optim.num_steps"
_POS_NUM = "optim.lr optim.eps optim.clip model.lora_alpha codi.remove_per_epoch"
_UNIT = "optim.warmup_ratio model.dropout model.lora_dropout codi.prj_dropout optim.b1 optim.b2"
_ENUMS = {
  "codi.method": {"codi", "cot_sft", "no_cot_sft", "coconut", "icot_si"},
  "codi.padding_mode": {"masked", "official", "official_fixmask"},
  "codi.distill_loss": {"smooth_l1", "l1", "l2"},
  "data.format": {"jsonl", "tfds"},
  "checkpoint.best_mode": {"max", "min"},
  "model.arch": {"gpt2", "llama", "qwen2"},
}
_INF_OK = {"codi.remove_all_when_remove_beyond", "codi.removal_smoothing_lambda"}
DEFAULTS = tiny_codi.get_config().to_dict()


def _is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v):
  return isinstance(v, int | float) and not isinstance(v, bool)


def train_value_sensible(path: str, value) -> bool:
  default = DEFAULTS
  for part in path.split("."):
    default = default[part]
  if value is None:
    return False
  if isinstance(default, bool) and not isinstance(value, bool):
    return False
  if _is_int(default) and path not in ("mesh.data", "mesh.fsdp", "mesh.tensor"):
    if not _is_int(value):
      return False
  if isinstance(default, float):
    if not _is_real(value) or math.isnan(value) or (math.isinf(value) and path not in _INF_OK):
      return False
  if isinstance(default, str) and not isinstance(value, str):
    return False
  if path in _POS_INT.split():
    return value >= 1
  if path in _NONNEG_INT.split():
    return value >= 0 and (path != "optim.num_steps" or value != 1)
  if path == "codi.num_latent_infer":
    return value >= -1
  if path in _POS_NUM.split():
    return value > 0
  if path in _UNIT.split():
    return 0 <= value < 1
  if path in _ENUMS:
    return value in _ENUMS[path]
  if path.startswith("mesh."):
    return _is_int(value) and (value == -1 or value >= 1)
  return True


def named_field(message: str, prefix: str) -> str:
  assert message.startswith(prefix), message
  return message[len(prefix) :].split(":")[0]


def related(field: str, paths) -> bool:
  """Whether the error's field is one of the mutated paths or shares a cross rule with one."""
  if any(p == field or p.startswith(field + ".") for p in paths):
    return True
  for rule in config_cross.CROSS_TRAIN:
    hit = any(field == f or field.startswith(f + ".") for f in rule.fields)
    if hit and any(p == f or p.startswith(f + ".") for p in paths for f in rule.fields):
      return True
  return False


# ---------------------------------------------------------------------------------------------
# codi_jax.train


@FUZZ
@given(st.lists(mutation(cs.TRAIN), min_size=1, max_size=3, unique_by=lambda m: m[0]))
def test_fuzz_train_config(mutations):
  config = copy.deepcopy(DEFAULTS)
  for path, value in mutations:
    assign(config, path, value)
  try:
    cs.validate_train(config, devices=1, processes=1)
  except InputError as e:
    field = named_field(one_line(e), "--config.")
    assert related(field, [p for p, _ in mutations]), (str(e), mutations)
    return
  for path, value in mutations:
    assert train_value_sensible(path, value), f"validated a nonsensical {path}={value!r}"


@FUZZ
@given(
  st.sampled_from(["", "model.", "codi.", "optim.", "data.synthetic.", "eval.", "mesh."]),
  st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
)
def test_fuzz_unknown_keys(group, name):
  path = group + name
  if path in cs.TRAIN or path in config_rules.group_paths(cs.TRAIN):
    return
  config = copy.deepcopy(DEFAULTS)
  assign(config, path, 1)
  with pytest.raises(InputError) as info:
    cs.validate_train(config, devices=1, processes=1)
  assert one_line(info.value).startswith(f"--config.{path}: unknown field")


# ---------------------------------------------------------------------------------------------
# codi_jax.evaluate

_EVAL_TYPED = {  # what absl can hand over for each flag type
  "int": st.one_of(st.none(), st.integers(-3, 10**9)),
  "num": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
  "bool": st.booleans(),
  "str": st.one_of(st.none(), st.text(max_size=5)),
  "enum": st.one_of(st.none(), st.text(max_size=8)),
  "seq": st.lists(st.text(max_size=5), max_size=3),
}


def eval_mutation():
  def value(path):
    rule = EVAL[path]
    edges = [v for v in boundary_values(rule) if not isinstance(v, list | tuple)]
    return st.one_of(_EVAL_TYPED[rule.kind], st.sampled_from(edges or [None]))

  paths = [p for p in sorted(EVAL) if p not in ("workdir", "official", "base", "data_dir")]
  return st.sampled_from(paths).flatmap(lambda p: st.tuples(st.just(p), value(p)))


@FUZZ
@given(st.lists(eval_mutation(), min_size=1, max_size=3, unique_by=lambda m: m[0]))
def test_fuzz_evaluate_flags(mutations):
  workdir = os.path.dirname(os.path.abspath(__file__))  # exists; never read by check()
  opts = Options(workdir=workdir, **dict(mutations))
  try:
    opts.check()
  except InputError as e:
    one_line(e)
    return
  d = dict(mutations)
  for name in ("batch_size", "max_new_tokens", "limit", "probe_topk", "latency_calls"):
    assert d.get(name) is None or d[name] >= 1, name
  assert d.get("num_latent") is None or d["num_latent"] >= 0
  assert d.get("lora_alpha") is None or (math.isfinite(d["lora_alpha"]) and d["lora_alpha"] > 0)
  assert d.get("mode", "auto") in ("auto", "student", "teacher", "both")
  assert d.get("padding_mode") in (None, "masked", "official", "official_fixmask")


# ---------------------------------------------------------------------------------------------
# soft_jax.generate and soft_jax.evaluate

GENERATE_FLAGS = dict(
  model="smollm2", max_new_tokens=32, dtype="float32", length_bucket=32, config=None, mode=None,
  seed=None, think_end=None, think_end_last_id=None, mesh=None, prompt=["hi"], chat=False,
  json=False, allow_extrapolation=False, **{k: None for k in cli_common.SAMPLER_FLAGS},
)  # fmt: skip
EVALUATE_FLAGS = {
  **{k: v for k, v in GENERATE_FLAGS.items() if k not in ("prompt", "chat", "json")},
  **dict(data="problems.jsonl", layout="auto", question_field=None, answer_field=None),
  **dict(id_field=None, limit=None, n_samples=1, out="/tmp/x", progress=True, k=["1"]),
  **dict(batch_size=8, judge="math_verify", overwrite=False),
}


def flag_mutation(base: dict):
  """(flag, value) as absl hands them over: None only for flags whose default is None."""
  rules = cli_common.soft_flag_rules()

  def value(name):
    return st.one_of(typed(name), st.none()) if base[name] is None else typed(name)

  def typed(name):
    rule = rules[name]
    if name == "after_temperature":  # a string flag: a number or `thinking`
      return st.sampled_from(["0", "0.6", "-1", "hot", "thinking", "nan"])
    if name in ("prompt", "k"):
      return st.lists(st.text(max_size=4), max_size=3)
    if name == "config":
      return st.sampled_from(
        [None, "configs/soft/smollm2.py", "configs/soft/smollm2.py:gumbel,math500", "nope.py"]
      )
    values = {
      "int": st.integers(-3, 2**32),
      "num": st.floats(allow_nan=True, allow_infinity=True),
      "bool": st.booleans(),
    }.get(rule.kind, st.text(max_size=8))
    edges = [v for v in boundary_values(rule) if isinstance(v, str | int | float)]
    if rule.kind in ("int", "num", "bool"):
      edges = [v for v in edges if not isinstance(v, str)]
    else:
      edges = [v for v in edges if isinstance(v, str)]
    return st.one_of(values, st.sampled_from(edges)) if edges else values

  return st.sampled_from(sorted(base)).flatmap(lambda n: st.tuples(st.just(n), value(n)))


def sampler_sensible(values: dict) -> bool:
  """The issue's ranges, written out here: a validated run never carries one of these."""
  bounds = {
    "temperature": lambda v: v >= 0,
    "top_p": lambda v: 0 < v <= 1,
    "after_top_p": lambda v: 0 < v <= 1,
    "min_p": lambda v: 0 <= v < 1,
    "after_min_p": lambda v: 0 <= v < 1,
    "top_k": lambda v: v >= 0,
    "after_top_k": lambda v: v >= 0,
    "max_topk": lambda v: v >= 1,
    "dirichlet_alpha": lambda v: v > 0,
    "gumbel_tau": lambda v: v > 0,
    "cold_stop_patience": lambda v: v >= 1,
    "max_thinking_tokens": lambda v: v >= 0,
    "max_new_tokens": lambda v: v >= 1,
    "length_bucket": lambda v: v >= 1,
    "seed": lambda v: v >= 0,
    "n_samples": lambda v: v >= 1,
    "batch_size": lambda v: v >= 1,
    "limit": lambda v: v >= 1,
  }
  for name, ok in bounds.items():
    v = values.get(name)
    if v is None:
      continue
    if isinstance(v, float) and not math.isfinite(v):
      return False
    if not ok(v):
      return False
  mode = values.get("mode")
  return mode is None or mode in ("greedy", "sample", "soft", "dirichlet", "gumbel")


def check_soft(base: dict, mutations, default_mode: str, extra=None):
  values = {**base, **dict(mutations)}
  try:
    st_ = cli_common.resolve(values, present={n for n, _ in mutations}, default_mode=default_mode)
    if extra is not None:
      extra(values)
  except InputError as e:
    assert one_line(e).startswith("--"), str(e)
    return
  assert sampler_sensible({k: v for k, v in values.items() if k != "mode"}), mutations
  assert sampler_sensible(st_.params.to_dict()), st_.params
  assert st_.max_new_tokens >= 1 and st_.length_bucket >= 1 and st_.seed >= 0


@FUZZ
@given(st.lists(flag_mutation(GENERATE_FLAGS), min_size=1, max_size=3, unique_by=lambda m: m[0]))
def test_fuzz_generate_flags(mutations):
  check_soft(GENERATE_FLAGS, mutations, "greedy")


@FUZZ
@given(st.lists(flag_mutation(EVALUATE_FLAGS), min_size=1, max_size=3, unique_by=lambda m: m[0]))
def test_fuzz_soft_evaluate_flags(mutations):
  def ks(values):
    got = soft_evaluate.parse_ks(values["k"] or [], values["n_samples"])
    assert all(1 <= k <= values["n_samples"] for k in got)

  check_soft(EVALUATE_FLAGS, mutations, "soft", extra=ks)


PRESET = cli_common.load_config("configs/soft/smollm2.py:dirichlet")


@FUZZ
@given(st.lists(mutation(cli_common.SOFT), min_size=1, max_size=2, unique_by=lambda m: m[0]))
def test_fuzz_soft_preset_fields(mutations):
  cfg = PRESET.to_dict()
  for path, value in mutations:
    assign(cfg, path, value)
  try:
    cli_common.check_preset(cfg, "p.py")
    cli_common.sampler_params(cfg["mode"], ml_collections.ConfigDict(cfg))
  except InputError as e:
    message = one_line(e)
    assert message.startswith(("--config=p.py: ", "--")), message
    return
  flat = {p.split(".")[-1]: v for p, v in mutations}
  assert sampler_sensible(flat), mutations


# ---------------------------------------------------------------------------------------------
# A few sampled valid cases, run for real

# Fields whose boundary values keep a 2-step tiny run short.
CHEAP = (
  "optim.lr optim.warmup_ratio optim.weight_decay optim.b1 optim.b2 optim.eps optim.clip "
  "codi.num_latent codi.num_latent_infer codi.alpha codi.beta codi.gamma codi.prj_dropout "
  "codi.prj_dim codi.distill_loss codi.distill_layers codi.padding_mode codi.distill_div_std "
  "codi.separate_teacher_target_pass codi.train_special_embeddings codi.remat_thoughts "
  "model.dropout eval.max_new_tokens eval.num_examples eval.batch_size checkpoint.keep "
  "checkpoint.every_steps checkpoint.best_mode log_every data.buckets seed"
).split()


def sampled_valid_overrides(seed: int, n: int) -> list[str]:
  """n `--config.path=value` overrides at boundary values that validate, chosen by `seed`."""
  rng = random.Random(seed)
  out, config = [], copy.deepcopy(DEFAULTS)
  for path in rng.sample(CHEAP, len(CHEAP)):
    rule = cs.TRAIN[path]
    values = boundary_values(rule) or ([True, False] if rule.kind == "bool" else [])
    rng.shuffle(values)
    for value in values:
      trial = copy.deepcopy(config)
      assign(trial, path, value)
      try:
        cs.validate_train(trial, devices=1, processes=1)
      except InputError:
        continue
      if isinstance(value, float) and (value != 0 and abs(value) < 1e-300):
        continue  # a denormal spelled on the command line parses back unchanged, but is unreadable
      config, text = trial, repr(value) if not isinstance(value, str) else value
      out.append(f"--config.{path}={text}")
      break
    if len(out) == n:
      return out
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step tiny run with sampled boundary values; exit 0 (the workdir is reused below)."""
  root = tmp_path_factory.mktemp("fuzz_train")
  overrides = sampled_valid_overrides(seed=0, n=5)
  proc = cli_util.run_module(
    "codi_jax.train", root, "--config=tests/tiny_codi.py", "--config.optim.num_steps=2",
    "--config.eval.every_steps=2", "--config.eval.num_examples=4", *overrides,
    f"--workdir={root / 'run'}", timeout=900,
  )  # fmt: skip
  assert proc.returncode == 0, (overrides, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr
  return root / "run", overrides


def test_sampled_valid_train_case_runs(trained):
  workdir, overrides = trained
  summary = json.loads((workdir / "final" / "run.json").read_text())
  assert summary["steps"] == 2 and len(overrides) == 5


def test_sampled_valid_evaluate_case_runs(trained, tmp_path):
  workdir, _ = trained
  rng = random.Random(1)
  flags = [f"--{n}=1" for n in rng.sample(["limit", "batch_size", "max_new_tokens"], 3)]
  flags += [f"--mode={rng.choice(['auto', 'student', 'teacher', 'both'])}"]
  proc = cli_util.run_module(
    "codi_jax.evaluate", tmp_path, f"--workdir={workdir}", *flags, f"--out={tmp_path / 'ev'}"
  )
  assert proc.returncode == 0, (flags, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr and os.listdir(tmp_path / "ev")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return tiny_hf.write(str(tmp_path_factory.mktemp("fuzz_tiny")), max_positions=256)


def test_sampled_valid_generate_case_runs(tmp_path, tiny_dir):
  rng = random.Random(2)
  mode = rng.choice(["greedy", "sample", "soft", "dirichlet", "gumbel"])
  flags = [f"--mode={mode}", "--max_new_tokens=1", "--length_bucket=1", "--seed=2147483647"]
  flags += rng.sample(["--top_k=0", "--temperature=0", "--top_p=1", "--min_p=0", "--max_topk=1"], 3)
  proc = cli_util.run_module(
    "soft_jax.generate", tmp_path, f"--model={tiny_dir}", "--prompt=w7 w8", "--json", *flags
  )
  assert proc.returncode == 0, (flags, proc.stderr[-3000:])
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["mode"] == mode and len(out["tokens"]) == 1


def test_sampled_valid_soft_evaluate_case_runs(tmp_path, tiny_dir):
  rng = random.Random(3)
  flags = ["--n_samples=2", "--k=1,2", "--batch_size=1", "--limit=1", "--max_new_tokens=2"]
  flags.append(f"--mode={rng.choice(['soft', 'dirichlet', 'gumbel'])}")
  data = os.path.join(cli_util.REPO, "tests", "fixtures", "math_problems.jsonl")
  proc = cli_util.run_module(
    "soft_jax.evaluate", tmp_path, f"--model={tiny_dir}", f"--data={data}",
    f"--out={tmp_path / 'o'}", "--judge=numeric", *flags,
  )  # fmt: skip
  assert proc.returncode == 0, (flags, proc.stderr[-3000:])
  assert json.loads(proc.stdout.strip().splitlines()[-1])["samples"] == 2


@pytest.mark.parametrize(
  "prog, args",
  [
    ("codi_jax.train", ["--config=tests/tiny_codi.py", "--config.optim.warmup_ratio=1.0"]),
    ("codi_jax.train", ["--config=tests/tiny_codi.py", "--config.data.batch_size=abc"]),
    ("codi_jax.evaluate", ["--workdir=/nonexistent", "--batch_size=0"]),
    ("soft_jax.generate", ["--prompt=hi", "--max_new_tokens=abc"]),
    ("soft_jax.generate", ["--prompt=hi", "--top_p=nan"]),
    ("soft_jax.evaluate", ["--data=x.jsonl", "--out=/tmp/o", "--n_samples=0"]),
  ],
)
def test_invalid_cases_through_the_real_clis(tmp_path, prog, args):
  cli_util.assert_usage_error(cli_util.run_module(prog, tmp_path, *args), prog)
