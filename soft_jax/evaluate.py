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
setting: model, mode, sampler, seed, data, judge counts, timing), each atomically, the summary
last. --out is checked before anything is read or loaded (a directory it can create and write).
Judged samples are appended to `<out>/samples.partial.jsonl` as each batch finishes (its first line
records the model, settings and problems); rerunning the same command resumes after them, to the
same samples and summary as an uninterrupted run, and other settings on the same --out are refused
in one line naming what differs. A complete result of the same settings is kept, not recomputed;
--overwrite replaces results and discards partial ones. Ctrl-C ends with one line (samples recorded,
where) and exit status 130. Bad input (flags, dataset lines) ends with one
`soft_jax.evaluate: error: ...` line and exit status 2.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from codi_jax import results, runtime
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
  records: results.Records | None = None,
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
    records: Where judged samples go as each batch finishes, keyed by sample id (a
      `results.Journal` resumes: the samples it holds are not decoded again); default in memory.

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
  records = results.Records() if records is None else records
  spent = {}

  def run(batch):  # sample s of problem p draws with sample id p * n_samples + s
    t0, compiles0 = time.perf_counter(), dec.compiles
    sids = [pi * n_samples + s for pi, s in batch]
    prompts = [ids[pi] for pi, _ in batch]
    out = dec(prompts, max_new_tokens=max_new_tokens, seed=seed, sample_ids=sids,
              length_bucket=width)  # fmt: skip
    judged = {}  # the padding rows of a last batch repeat its own rows: judged once
    for item, r in zip(batch, out):
      if item not in judged:
        judged[item] = sample_record(problems[item[0]], item[1], item[0] * n_samples + item[1], r)
    spent["batch"] = (time.perf_counter() - t0, dec.compiles - compiles0)
    return [judged[item] for item in batch]

  def sample_record(prob, s, sample_id, r):
    text = tokenizer.decode(r.tokens, skip_special_tokens=True)
    v = math_answers.check_answer(text, prob.answer, judge=judge)
    return {
      "problem": prob.id,
      "sample": s,
      "sample_id": sample_id,
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

  def on_batch(positions, samples):
    seconds, compiles = spent.pop("batch")
    records.append(zip(positions, samples), seconds=seconds, compiles=compiles)

  bar = f"evaluate {params.mode}" if progress else None
  fixed_batches(rows, batch_size, run, progress=bar, done=records.done, on_batch=on_batch)
  samples = [records.done[i] for i in range(len(rows))]  # position i is sample id i
  summary = summarize_samples(samples, ks)
  total = sum(x["completion_tokens"] for x in samples)
  seconds = records.seconds
  summary.update(
    {
      "seconds": round(seconds, 3),
      "tokens": total,
      "tokens_per_second": round(total / seconds, 2) if seconds > 0 else None,
      "decoder_compiles": records.compiles,
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime.setup_cli()
  v = cli_common.value
  with results.exit_on_interrupt(PROG), exit_on_input_error(PROG):
    st = cli_common.settings(default_mode="soft", prog=PROG)
    if not v("data"):
      raise InputError("--data: no problem file given")
    if not v("out"):
      raise InputError("--out: no output directory given")
    if v("n_samples") < 1:
      raise InputError(f"--n_samples: must be >= 1, got {v('n_samples')}")
    ks = parse_ks(v("k") or [], v("n_samples"))
    out_dir = results.check_out(v("out"))  # before any problem is read or model loaded
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
    settings = {
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
    }
    identity = {
      "model": {"spec": st.model, "files": results.fingerprint(loaded.source)},
      "settings": {**settings, "length_bucket": st.length_bucket},
      "data": {
        "problems": len(probs),
        "sha256": results.digest([[p.id, p.question, p.answer] for p in probs]),
      },
    }
    journal = results.Journal(
      out_dir,
      "samples",
      identity,
      summary="summary.json",
      total=len(probs) * v("n_samples"),
      unit="samples",
      overwrite=v("overwrite"),
    )
    if journal.complete is not None:
      summary = journal.complete
      print(f"kept the complete result in {out_dir} (--overwrite recomputes it)", file=sys.stderr)
    else:
      if journal.done:
        print(
          f"resuming after {len(journal.done)} of {journal.total} samples recorded in "
          f"{journal.path}",
          file=sys.stderr,
          flush=True,
        )
      with journal, sharding.use_mesh(st.mesh, st.rules):
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
          records=journal,
        )
      import jax  # pylint: disable=import-outside-toplevel

      summary["settings"] = {
        **settings,
        "device": str(jax.devices()[0].device_kind),
        "host": platform.node(),
      }
      write_atomic(
        os.path.join(out_dir, "samples.jsonl"),
        "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in samples),
      )
      summary = journal.finish(summary)  # last: a result with its summary is complete
  keys = ("problems", "samples", "pass@1", "pass@k", "mean_thinking_tokens")
  print(json.dumps({k: summary[k] for k in (*keys, "mean_completion_tokens")}))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=runtime.flags_parser(PROG))
