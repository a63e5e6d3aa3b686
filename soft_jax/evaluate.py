r"""Evaluate greedy, token sampling, Soft Thinking and its stochastic variants on math problems.

  python -m soft_jax.evaluate --config=configs/soft/smollm2.py --data=tests/fixtures/math_problems.jsonl \
      --n_samples=4 --k=1,2,4 --limit=4 --out=/tmp/soft_eval
  python -m soft_jax.evaluate --config=configs/soft/smollm2.py:gumbel --data=gsm8k_test.jsonl \
      --layout=gsm8k --gumbel_tau=0.6 --batch_size=8 --out=/tmp/soft_eval_gumbel

Protocol (docs/soft_thinking.md, evaluation protocol and judging): each problem becomes one user turn (math
instruction, then the problem) through the model's chat template, `<think>\n` appended when the
vocabulary has a `<think>` token the template did not open; n samples per problem are n rows with
distinct sample ids (row p * n + s), so a sample's draws depend only on the seed and its id, never on
the batch it shares. Rows run through `SoftDecoder` in fixed-shape batches of --batch_size (the last
one padded; prompts padded to one length bucket for the whole set: one compile). Every sample is
judged on its whole completion (thinking trace + answer) by `math_answers.check_answer` in the main
thread with --judge (default math_verify alone, the reference's rule; `numeric` and
`numeric_then_math_verify` reach our sympy-free numeric rule), and the metrics are
`metrics.summarize`: pass@1 (mean over problems of the mean correctness), unbiased pass@k, mean
thinking/completion length over all samples and over the correct ones.

Writes `<out>/samples.jsonl` (one line per sample) and `<out>/summary.json` (metrics plus every
setting: model, mode, sampler, seed, data, judge counts, timing), each atomically. Bad input (flags,
dataset lines) ends with one `soft_jax.evaluate: error: ...` line and exit status 2.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from codi_jax import runtime
from codi_jax.batching import bucket_size, fixed_batches
from codi_jax.errors import InputError, exit_on_input_error
from codi_jax.files import write_atomic
from codi_jax.models import memory
from soft_jax import cli_common, decode, math_answers, metrics, problems, thinking

PROG = "soft_jax.evaluate"


def _define_flags():
  """This program's flags (defined only when run as a program: importing defines none)."""
  cli_common.define("decode", "extrapolation", "sampler", "data", "samples", "output")
  flags.DEFINE_list("k", ["1"], "The k of each reported pass@k (each <= --n_samples).")
  flags.DEFINE_integer("batch_size", 8, "Rows (samples) per decoder call.")
  flags.DEFINE_enum(
    "judge",
    math_answers.DEFAULT_JUDGE,
    list(math_answers.JUDGES),
    "Answer checker: math_verify (the reference's rule) | numeric (our sympy-free rule, "
    "plain-number golds only) | numeric_then_math_verify (numeric when both sides are plain "
    "numbers, else math_verify).",
  )


def parse_ks(values: Sequence[str], n_samples: int) -> list[int]:
  """--k values as sorted distinct ints in [1, n_samples]; InputError naming the flag otherwise."""
  ks = []
  for v in values:
    try:
      k = int(str(v).strip())
    except ValueError:
      raise InputError(f"--k: expected integers, got {v!r}") from None
    if not 1 <= k <= n_samples:
      raise InputError(f"--k: {k} is outside 1..--n_samples={n_samples}")
    ks.append(k)
  if not ks:
    raise InputError("--k: no value given")
  return sorted(set(ks))


def check_judge(judge: str, probs) -> None:
  """InputError, before any decoding, for an unknown judge or a gold that `judge` cannot read."""
  if judge not in math_answers.JUDGES:
    raise InputError(f"--judge: expected one of {', '.join(math_answers.JUDGES)}, got {judge!r}")
  if judge != "numeric":
    return
  for p in probs:
    try:
      number = math_answers.parse_number(math_answers.gold_text(p.answer))
    except ValueError as e:
      raise InputError(f"problem {p.id}: {e}") from None
    if number is None:
      raise InputError(
        f"--judge=numeric: problem {p.id}: gold {p.answer!r} is not a plain number "
        "(use --judge=math_verify or numeric_then_math_verify)"
      )


def prompt_ids(tokenizer, question: str, think_end_id: int | None) -> list[int]:
  """Chat-templated math prompt ids (docs/soft_thinking.md 9.2); `<think>\\n` opened when the model has one."""

  ids = tokenizer.encode(problems.build_math_prompt(tokenizer, question), add_special_tokens=False)
  if think_end_id is not None:
    ids = thinking.open_thinking(tokenizer, ids)
  return ids


def evaluate(
  model,
  tokenizer,
  problems,
  params,
  *,
  n_samples: int,
  ks: Sequence[int],
  max_new_tokens: int,
  batch_size: int = 8,
  seed: int = 0,
  think_end_id: int | None = None,
  length_bucket: int = 32,
  judge: str = math_answers.DEFAULT_JUDGE,
  progress: bool = False,
  allow_extrapolation: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Decodes n samples of every problem, judges them and summarizes.

  Args:
    model: The Transformer.
    tokenizer: Its codi_jax Tokenizer (chat template, encode/decode, pad/eos ids).
    problems: `problems.Problem`s.
    params: SamplerParams (validated against the vocabulary here).
    n_samples: Samples per problem.
    ks: pass@k values (each <= n_samples).
    max_new_tokens: One budget for thinking + answer.
    batch_size: Rows per decoder call (fixed shape; the last batch is padded).
    seed: The call seed; sample s of problem p uses sample id p * n_samples + s.
    think_end_id: The `</think>` id, or None.
    length_bucket: Prompt lengths are padded to one multiple of this for the whole set.
    judge: `math_answers.check_answer` judge (one of `math_answers.JUDGES`).
    progress: Show a tqdm bar.
    allow_extrapolation: Decode past a RoPE model's positions (else refused before decoding).

  Returns:
    (summary, samples): `metrics.summarize` output plus timing, and one dict per sample.
  """

  if n_samples < 1:
    raise InputError(f"--n_samples: must be >= 1, got {n_samples}")
  if batch_size < 1:
    raise InputError(f"--batch_size: must be >= 1, got {batch_size}")
  if max_new_tokens < 1:
    raise InputError(f"--max_new_tokens: must be >= 1, got {max_new_tokens}")
  if length_bucket < 1:
    raise InputError(f"--length_bucket: must be >= 1, got {length_bucket}")
  check_judge(judge, problems)
  params = params.validate(prefix="--", vocab=model.cfg.vocab_size)
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
  dec = decode.SoftDecoder(
    model, params, pad_id=pad, eos_ids=tokenizer.eos_ids, think_end_id=think_end_id
  )
  ids = [prompt_ids(tokenizer, p.question, think_end_id) for p in problems]
  memory.check_positions(
    model.cfg, max(len(i) for i in ids), max_new_tokens, allow_extrapolation=allow_extrapolation
  )
  width = bucket_size(max(len(i) for i in ids), length_bucket)  # one prompt shape for all batches
  rows = [(pi, s) for pi in range(len(problems)) for s in range(n_samples)]

  def run(batch):  # sample s of problem p draws with sample id p * n_samples + s
    sids = [pi * n_samples + s for pi, s in batch]
    prompts = [ids[pi] for pi, _ in batch]
    return dec(prompts, max_new_tokens=max_new_tokens, seed=seed, sample_ids=sids,
               length_bucket=width)  # fmt: skip

  t0 = time.perf_counter()
  bar = f"evaluate {params.mode}" if progress else None
  results = fixed_batches(rows, batch_size, run, progress=bar)
  seconds = time.perf_counter() - t0

  samples = []
  for (pi, s), r in zip(rows, results):
    prob = problems[pi]
    text = tokenizer.decode(r.tokens, skip_special_tokens=True)
    v = math_answers.check_answer(text, prob.answer, judge=judge)
    samples.append(
      {
        "problem": prob.id,
        "sample": s,
        "sample_id": pi * n_samples + s,
        "gold": prob.answer,
        "text": text,
        "tokens": r.tokens,
        "completion_tokens": len(r.tokens),
        "thinking_tokens": r.thinking_tokens,
        "thinking_closed": r.thinking_closed,
        "stop_reason": r.stop_reason,
        "prediction": v.prediction,
        "judge": v.judge,
        "note": v.note,
        "correct": bool(v.correct),
      }
    )
  summary = summarize_samples(samples, ks)
  total = sum(x["completion_tokens"] for x in samples)
  summary.update(
    {
      "seconds": round(seconds, 3),
      "tokens": total,
      "tokens_per_second": round(total / seconds, 2) if seconds > 0 else None,
      "decoder_compiles": dec.compiles,
    }
  )
  return summary, samples


def summarize_samples(samples: Sequence[dict[str, Any]], ks: Sequence[int]) -> dict[str, Any]:
  """`metrics.summarize` from sample records (grouped by problem, in first-seen order)."""

  by_problem: dict[str, list[dict[str, Any]]] = collections.OrderedDict()
  for x in samples:
    by_problem.setdefault(str(x["problem"]), []).append(x)
  groups = list(by_problem.values())
  out = metrics.summarize(
    [[x["correct"] for x in g] for g in groups],
    {
      "thinking_tokens": [[x["thinking_tokens"] for x in g] for g in groups],
      "completion_tokens": [[x["completion_tokens"] for x in g] for g in groups],
    },
    ks,
  )
  for pid, row in zip(by_problem, out["per_problem"]):
    row["problem"] = pid
  out["pass@k"] = {str(k): v for k, v in out["pass@k"].items()}
  out["judges"] = dict(collections.Counter(x["judge"] for x in samples))
  out["stop_reasons"] = dict(collections.Counter(x["stop_reason"] for x in samples))
  return out


def write_outputs(out_dir: str, summary: dict[str, Any], samples: Sequence[dict[str, Any]]) -> None:
  """`<out>/samples.jsonl` and `<out>/summary.json`, each written atomically."""
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise InputError(f"--out: cannot create {out_dir}: {e.strerror}") from None
  write_atomic(
    os.path.join(out_dir, "samples.jsonl"),
    "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in samples),
  )
  write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime.setup_cli()
  v = cli_common.value
  with exit_on_input_error(PROG):
    st = cli_common.settings(default_mode="soft")
    if not v("data"):
      raise InputError("--data: no problem file given")
    if not v("out"):
      raise InputError("--out: no output directory given")
    if v("n_samples") < 1:
      raise InputError(f"--n_samples: must be >= 1, got {v('n_samples')}")
    ks = parse_ks(v("k") or [], v("n_samples"))
    from codi_jax import sharding  # pylint: disable=import-outside-toplevel
    from codi_jax.models import loader  # pylint: disable=import-outside-toplevel

    probs = problems.read_problems(
      v("data"),
      layout=v("layout"),
      question_field=v("question_field"),
      answer_field=v("answer_field"),
      id_field=v("id_field"),
      limit=v("limit"),
    )
    check_judge(v("judge"), probs)  # before loading the model
    loaded = loader.load(st.model, dtype=st.dtype, param_dtype=st.dtype)
    end_id = thinking.resolve_think_end(
      loaded.tokenizer, st.think_end, last_id=st.think_end_last_id
    )
    with sharding.use_mesh(st.mesh, st.rules):
      summary, samples = evaluate(
        loaded.model,
        loaded.tokenizer,
        probs,
        st.params,
        n_samples=v("n_samples"),
        ks=ks,
        max_new_tokens=st.max_new_tokens,
        batch_size=v("batch_size"),
        seed=st.seed,
        think_end_id=end_id,
        length_bucket=st.length_bucket,
        judge=v("judge"),
        progress=v("progress"),
        allow_extrapolation=st.allow_extrapolation,
      )
    import jax  # pylint: disable=import-outside-toplevel

    summary["settings"] = {
      "model": st.model,
      "mode": st.mode,
      "data": v("data"),
      "layout": v("layout"),
      "n_samples": v("n_samples"),
      "k": ks,
      "limit": v("limit"),
      "batch_size": v("batch_size"),
      "max_new_tokens": st.max_new_tokens,
      "dtype": st.dtype,
      "seed": st.seed,
      "think_end_id": end_id,
      "judge": v("judge"),
      "sampler": st.params.to_dict(),
      "device": str(jax.devices()[0].device_kind),
      "host": platform.node(),
    }
    write_outputs(v("out"), summary, samples)
  keys = ("problems", "samples", "pass@1", "pass@k", "mean_thinking_tokens")
  print(json.dumps({k: summary[k] for k in (*keys, "mean_completion_tokens")}))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=runtime.flags_parser(PROG))
