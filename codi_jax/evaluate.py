r"""Evaluate a finished CODI run: accuracy per dataset, per-example JSONL, efficiency, probing.

  python -m codi_jax.evaluate --workdir=/tmp/codi_demo
  python -m codi_jax.evaluate --workdir=/tmp/codi_demo --cot_workdir=/tmp/cot --probe
  python -m codi_jax.evaluate --workdir=runs/gpt2 --data=gsm8k --data=svamp --data=multiarith
  python -m codi_jax.evaluate --workdir=runs/gpt2 --data=gsm8k=/data/gsm8k_test.jsonl --data=my.jsonl

The model, tokenizer and config come from `<workdir>/final` (written by `codi_jax.train`); an
optional --config replaces the saved `data`, `eval` and `seed` settings (which test set, batch
size, max_new_tokens). Decoding is greedy and jitted on fixed-shape batches (one compile per
question-length bucket): a CODI student encodes [question][bot], runs N continuous thoughts,
feeds [eot] and decodes the answer on the cache; a CoT-SFT model decodes CoT + answer from the
question; a No-CoT-SFT model is the student with 0 thoughts. Rows stop at eos (and the
tokenizer's other stop ids). Answers are extracted as the reference (docs/codi.md 7.2).

Writes to <workdir>/eval (or --out), each file atomically:
  <dataset>.json            accuracy, n, mean generated tokens, thoughts, compiles, timing
  <dataset>.examples.jsonl  question, gold, prediction, extracted, correct, n_tokens per example
  <dataset>.efficiency.json tokens per problem, compression and latency (with --efficiency or
                            --cot_workdir; the CoT-SFT run is --cot_workdir)
  <dataset>.probe.json/.txt top-k decoded tokens of each thought and the Table-3 metric (--probe)
Files of a mode other than the model's own (--mode=teacher on a CODI run) get a `.teacher` /
`.student` suffix, and a --num_latent other than the trained one a `.latent<N>` suffix.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import dataclasses

from absl import app, flags
from ml_collections import config_flags

from codi_jax import runtime
from codi_jax.errors import InputError, exit_on_input_error
from codi_jax.eval_lib import MODES, Options, evaluate

PROG = "codi_jax.evaluate"


# ---------------------------------------------------------------------------------------- CLI

_CONFIG = _WORKDIR = None  # flag holders, set by _define_flags()


def _define_flags():
  """CLI flags, defined only when run as a program, so that importing this module defines none."""
  global _CONFIG, _WORKDIR  # pylint: disable=global-statement
  _CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Optional config (configs/*.py): its data, eval and seed settings replace the run's.",
  )
  _WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory holding final/ (from codi_jax.train)."
  )
  flags.DEFINE_multi_string(
    "data",
    [],
    "Dataset (repeatable): test | valid | synthetic:<split> | gsm8k | svamp | gsm-hard | "
    "multiarith | commonsense | <name>=<file>[,<file>] | <file>.json(l). Default: --split.",
  )
  flags.DEFINE_enum(
    "split", "test", ["test", "valid"], "The run's split to evaluate when --data is absent."
  )
  flags.DEFINE_enum(
    "mode",
    "auto",
    list(MODES),
    "auto: the student for codi / no_cot_sft runs, explicit CoT for cot_sft runs.",
  )
  flags.DEFINE_string("cot_workdir", None, "A CoT-SFT run to compare with (efficiency report).")
  flags.DEFINE_bool("efficiency", False, "Write the efficiency report (implied by --cot_workdir).")
  flags.DEFINE_integer("batch_size", None, "Evaluation batch (default: config.eval.batch_size).")
  flags.DEFINE_integer(
    "max_new_tokens", None, "Decoding cap (default: config.eval.max_new_tokens)."
  )
  flags.DEFINE_integer(
    "num_latent", None, "Continuous thoughts at inference (default: as configured)."
  )
  flags.DEFINE_integer(
    "limit", None, "First N examples per dataset (default: config.eval.num_examples)."
  )
  flags.DEFINE_string("out", None, "Output directory (default: <workdir>/eval).")
  flags.DEFINE_enum(
    "mask_special",
    "all",
    ["all", "eot_only"],
    "Never emit pad/bot/eot (all), or only eot (the reference's test.py).",
  )
  flags.DEFINE_bool("probe", False, "Decode each continuous thought through the LM head; Table 3.")
  flags.DEFINE_integer("probe_topk", 5, "Decoded tokens per probed vector.")
  flags.DEFINE_enum(
    "probe_source",
    "pre_prj",
    ["pre_prj", "post_prj"],
    "pre_prj: last hidden state before the projection (the paper); post_prj: the thoughts.",
  )
  flags.DEFINE_bool(
    "probe_all", False, "Probe every problem (default: only correctly answered ones)."
  )
  flags.DEFINE_integer(
    "latency_calls", 5, "Timed calls per latency figure, after one warm-up call."
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime.setup_cli()
  override = runtime.config_value(_CONFIG, PROG)
  override = None if override is None else override.copy_and_resolve_references()
  with exit_on_input_error(PROG):
    if not _WORKDIR.value:
      raise InputError("--workdir: required (the run directory holding final/)")
    fields = [f.name for f in dataclasses.fields(Options) if f.name not in ("workdir", "progress")]
    evaluate(Options(workdir=_WORKDIR.value, **{k: flags.FLAGS[k].value for k in fields}), override)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=runtime.flags_parser(PROG))
