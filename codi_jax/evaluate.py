r"""Evaluate CODI: a finished run, or an official CODI checkpoint on its base model. Accuracy per
set, per-example JSONL, efficiency, probing.

  python -m codi_jax.evaluate --workdir=/tmp/codi_demo
  python -m codi_jax.evaluate --workdir=/tmp/codi_demo --cot_workdir=/tmp/cot --probe
  python -m codi_jax.evaluate --workdir=runs/gpt2 --sets=gsm8k,svamp,gsm_hard,multiarith \
      --data_dir=/data/eval
  python -m codi_jax.evaluate --workdir=runs/gpt2 --sets=gsm8k,svamp --set_path=svamp=/x/SVAMP.json
  python -m codi_jax.evaluate --official=/ckpt/codi_gpt2 --base=/models/gpt2 --sets=gsm8k \
      --data_dir=/data/eval

--workdir: the model, tokenizer and config come from `<workdir>/final` (written by
`codi_jax.train`); an optional --config replaces the saved `data`, `eval` and `seed` settings.
--official: a checkpoint in the reference's layout (docs/codi.md 8: `codi.base_model.model.*` with
peft LoRA tensors, `prj.*`; one model.safetensors, a sharded model.safetensors.index.json, or
pytorch_model.bin with torch installed) on --base, the base model's HF directory (config.json and
tokenizer; `<out>` of `codi_jax.export` works too). pad/bot/eot are ids V, V+1, V+2 as in the
reference; the LoRA rank is read off the checkpoint, alpha is --lora_alpha (default: the
checkpoint's codi_config.json, else 32). Unless codi_config.json (written by codi_jax.export) or a
flag says otherwise, inference is the reference test.py's: 6 thoughts, --padding_mode=official
(batches in input order, positions and unmasked passes as the reference), batch 128, 256 tokens.

--sets (comma-separated): test / valid (a run's own splits), synthetic:<split>, gsm8k, svamp,
gsm_hard, multiarith, gsm8k_aug_test, commonsense, or .json/.jsonl files with question and answer
fields. A named set is read from --set_path=NAME=FILE if given, else from --data_dir under its
standard file name (gsm8k/test.jsonl, svamp/SVAMP.json, gsm_hard/gsmhardv2.jsonl,
multiarith/mawpsmultiarith.jsonl, gsm8k_aug/test.txt), else from its HF hub copy (needs the
`datasets` package and network). Decoding is greedy and jitted on fixed-shape batches (one compile
per question-length bucket): a CODI student encodes [question][bot], runs N continuous thoughts,
feeds [eot] and decodes the answer on the cache; a CoT-SFT model decodes CoT + answer from the
question; a No-CoT-SFT model is the student with 0 thoughts. Rows stop at eos (and the
tokenizer's other stop ids). Answers are extracted and scored as the reference (docs/codi.md 7.2:
exact float equality; sets with non-integer golds, such as GSM-Hard, also report near misses).

Writes to <workdir>/eval (or <checkpoint dir>/eval, or --out; checked before anything is read or
loaded: a directory it can create and write), each file atomically:
  <set>.json                accuracy, n (rows used), generated tokens, thoughts, compiles, seconds,
                            the reader's report (rows read, dropped and why)
  <set>.examples.jsonl      question, gold, prediction, extracted, correct, tokens per example
  <set>.efficiency.json     tokens per problem, compression and latency (with --efficiency or
                            --cot_workdir; the CoT-SFT run is --cot_workdir)
  <set>.probe.json/.txt     top-k decoded tokens of each thought and the Table-3 metric (--probe)
and prints one table. Files of a mode other than the model's own (--mode=teacher on a CODI run) get
a `.teacher` / `.student` suffix, a --num_latent other than the trained one `.latent<N>`, and a
--padding_mode other than the run's `.<padding_mode>`.

Interruptions lose nothing finished: each set's examples are appended to <set>.partial.jsonl as
batches finish (its first line records the model, settings and set); the summary is written last,
from those records, and the journal removed. Rerunning the same command resumes after the recorded
batches, to the same results as an uninterrupted run; other settings, model or set on the same
--out are refused in one line naming what differs. A complete result of the same evaluation is
kept, not recomputed; --overwrite replaces results and discards partial ones. Ctrl-C ends with one
line (how many problems are recorded, where) and exit status 130.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import dataclasses

from absl import app, flags
from ml_collections import config_flags

from codi_jax import results, runtime
from codi_jax.errors import InputError, exit_on_input_error
from codi_jax.eval_lib import MODES, PADDING_MODES, Options, evaluate

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
  flags.DEFINE_string(
    "official",
    None,
    "A checkpoint in the official CODI layout (file or directory) to evaluate on --base.",
  )
  flags.DEFINE_string(
    "base", None, "With --official: the base model's HF directory (config.json + tokenizer)."
  )
  flags.DEFINE_list(
    "sets",
    [],
    "Evaluation sets, comma-separated: test | valid | synthetic:<split> | gsm8k | svamp | "
    "gsm_hard | multiarith | gsm8k_aug_test | commonsense | <file>.json(l). Default: test.",
  )
  flags.DEFINE_string(
    "data_dir", "", "Folder holding the named sets' files under their standard names."
  )
  flags.DEFINE_multi_string(
    "set_path", [], "NAME=FILE (repeatable): read named set NAME from FILE (overrides --data_dir)."
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
    "num_latent", None, "Continuous thoughts at inference (default: as configured; official: 6)."
  )
  flags.DEFINE_enum(
    "padding_mode",
    None,
    list(PADDING_MODES),
    "Padded questions: masked (ours) or the reference's unmasked latent/answer passes (official; "
    "official_fixmask: its fix_attn_mask=True). Default: the run's own; --official: official.",
  )
  flags.DEFINE_integer(
    "lora_rank", None, "With --official: expected LoRA rank (default: the checkpoint's)."
  )
  flags.DEFINE_float(
    "lora_alpha", None, "With --official: LoRA alpha (default: codi_config.json's, else 32)."
  )
  flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"], "With --official: weights and compute dtype (float32)."
  )
  flags.DEFINE_integer(
    "limit", None, "First N examples per dataset (default: config.eval.num_examples)."
  )
  flags.DEFINE_string(
    "out", None, "Output directory (default: <workdir>/eval or <checkpoint dir>/eval)."
  )
  flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace results already in --out (a complete result of other settings is refused without "
    "it; one of the same settings is kept) and discard partial ones instead of resuming them.",
  )
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
  flags.DEFINE_bool(
    "allow_extrapolation",
    False,
    "Decode past the model's positions (RoPE models only; quality degrades there). Without it, "
    "a question + thoughts + --max_new_tokens beyond them is refused before decoding.",
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime.setup_cli()
  override = runtime.config_value(_CONFIG, PROG)
  override = None if override is None else override.copy_and_resolve_references()
  with results.exit_on_interrupt(PROG), exit_on_input_error(PROG):
    if override is not None and not _WORKDIR.value:
      raise InputError("--config: only with --workdir (it replaces a run's saved settings)")
    fields = [f.name for f in dataclasses.fields(Options) if f.name != "progress"]
    evaluate(Options(**{k: flags.FLAGS[k].value for k in fields}), override)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=runtime.flags_parser(PROG))
