"""docs/config.md is generated from the option classes, and each class owns its rules: the file
matches the code, every training field is in it, and no option module imports upward."""

import ast
import dataclasses
import os

import pytest

from codi_jax import config_reference, options, train_options
from codi_jax.errors import InputError
from configs import base, demo, gpt2, llama1b

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules that declare option classes, and the modules above them that they must never import.
OWNERS = (
  "codi_jax/codi/build.py",
  "codi_jax/codi/method_options.py",
  "codi_jax/data/sources.py",
  "codi_jax/data/synthetic.py",
  "codi_jax/data/multiplication.py",
  "codi_jax/train_step.py",
  "codi_jax/eval_runner.py",
  "codi_jax/sharding.py",
  "codi_jax/checkpoint.py",
  "soft_jax/sampling.py",
)
ABOVE = ("codi_jax.train_options", "codi_jax.config_reference", "codi_jax.train_lib", "importlib")


def test_the_committed_reference_is_what_the_code_generates():
  generated = config_reference.markdown(base.get_config())
  with open(os.path.join(REPO, "docs", "config.md"), encoding="utf-8") as f:
    committed = f.read()
  assert committed == generated, "run: python -m codi_jax.config_reference --out=docs/config.md"


def test_every_training_field_has_a_row_with_its_default():
  text = config_reference.markdown(base.get_config())
  for path in train_options.TRAIN:
    assert f"| `{path}` | `" in text, path
  lr = base.get_config().optim.lr
  assert f"| `optim.lr` | `{lr!r}` | a number > 0 | peak learning rate |" in text


@pytest.mark.parametrize("module", [demo, gpt2, llama1b])
def test_shipped_configs_build_frozen_typed_options(module):
  config = module.get_config()
  opts = train_options.validate_train(config, devices=1, processes=1, platform="cpu")
  assert isinstance(opts, train_options.TrainOptions)
  assert opts.optim.lr == config.optim.lr and opts.data.synthetic.ops == tuple(
    config.data.synthetic.ops
  )
  assert opts.codi.method == config.codi.method and opts.mesh.data == config.mesh.data
  with pytest.raises(dataclasses.FrozenInstanceError):
    opts.optim.lr = 1.0  # type: ignore[misc]


def test_a_section_class_checks_itself_with_the_one_line_form():
  config = base.get_config()
  config.optim.lr = -1.0
  with pytest.raises(InputError, match=r"^--config\.optim\.lr: got -1\.0; expected a number > 0$"):
    options.from_config(train_options.TrainOptions, config)
  from codi_jax.train_step import OptimOptions  # pylint: disable=import-outside-toplevel

  with pytest.raises(InputError, match=r"^--config\.lr: got -1\.0"):
    options.from_config(OptimOptions, config.optim)


@pytest.mark.parametrize("path", OWNERS)
def test_option_modules_import_nothing_above_them(path):
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  imported = set()
  for node in ast.walk(tree):  # function-level imports included
    if isinstance(node, ast.Import):
      imported |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
  assert not [m for m in imported if m in ABOVE or m.startswith("soft_jax.cli_common")]
