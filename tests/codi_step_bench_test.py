"""benchmarks/codi_step.py builds its model through `build.build_model` as training does: the
stand-in tokenizer must satisfy what the builder asks of one (it once lacked `token_to_id`)."""

import importlib.util
import os

from codi_jax.codi import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
  path = os.path.join(REPO, "benchmarks", "codi_step.py")
  spec = importlib.util.spec_from_file_location("codi_step_bench", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_benchmark_model_builds_with_pad_bot_eot_after_the_gpt2_vocabulary():
  bench = _load_script()
  codi, _, special = build.build_model(bench.make_config(0.0), bench._VocabOnlyTokenizer())
  assert (special.pad, special.bot, special.eot, special.eos) == (
    bench.VOCAB,
    bench.VOCAB + 1,
    bench.VOCAB + 2,
    bench.EOS,
  )
  assert codi.backbone.cfg.vocab_size == bench.VOCAB + 3
  assert codi.backbone.cfg.num_layers == bench.LAYERS
