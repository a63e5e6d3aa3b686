r"""Evaluate greedy, token sampling, Soft Thinking and its stochastic variants on math problems.

  python -m soft_jax.evaluate --config=configs/soft/smollm2.py --data=tests/fixtures/math_problems.jsonl \
      --n_samples=4 --k=1,2,4 --limit=4 --out=/tmp/soft_eval
  python -m soft_jax.evaluate --config=configs/soft/smollm2.py:gumbel --data=gsm8k_test.jsonl \
      --layout=gsm8k --gumbel_tau=0.6 --batch_size=8 --out=/tmp/soft_eval_gumbel

Protocol (shared/spec/soft_thinking.md section 7): each problem becomes one user turn (math
instruction, then the problem) through the model's chat template, `<think>\n` appended when the
vocabulary has a `<think>` token the template did not open; n samples per problem are n rows with
distinct sample ids (row p * n + s), so a sample's draws depend only on the seed and its id, never on
the batch it shares. Rows run through `SoftDecoder` in fixed-shape batches of --batch_size (the last
one padded; prompts padded to one length bucket for the whole set: one compile). Every sample is
judged on its whole completion (thinking trace + answer) by `math_answers.check_answer` in the main
thread, and the metrics are `metrics.summarize`: pass@1 (mean over problems of the mean correctness),
unbiased pass@k, mean thinking/completion length over all samples and over the correct ones.

Writes `<out>/samples.jsonl` (one line per sample) and `<out>/summary.json` (metrics plus every
setting: model, mode, sampler, seed, data, judge counts, timing), each atomically. Bad input (flags,
dataset lines) ends with one `soft_jax.evaluate: error: ...` line and exit status 2.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from codi_jax import runtime
from codi_jax.errors import InputError, exit_on_input_error
from soft_jax import cli_common

_DATA, _LAYOUT, _LIMIT, _OUT = cli_common.DATA, cli_common.LAYOUT, cli_common.LIMIT, cli_common.OUT
_QUESTION_FIELD, _ANSWER_FIELD = cli_common.QUESTION_FIELD, cli_common.ANSWER_FIELD
_ID_FIELD, _N_SAMPLES, _PROGRESS = cli_common.ID_FIELD, cli_common.N_SAMPLES, cli_common.PROGRESS
_K = flags.DEFINE_list("k", ["1"], "The k of each reported pass@k (each <= --n_samples).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows (samples) per decoder call.")
_JUDGE = flags.DEFINE_enum("judge", "auto", ["auto", "numeric", "math_verify"], "Answer checker.")


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


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` via a temporary file in the same directory and a rename."""
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def prompt_ids(tokenizer, question: str, think_end_id: int | None) -> list[int]:
  """Chat-templated math prompt ids (spec 7.2); `<think>\\n` opened when the model has one."""
  from soft_jax import decode, problems  # pylint: disable=import-outside-toplevel

  ids = tokenizer.encode(problems.build_math_prompt(tokenizer, question), add_special_tokens=False)
  if think_end_id is not None:
    ids = decode.open_thinking(tokenizer, ids)
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
  judge: str = "auto",
  progress: bool = False,
  mesh=None,
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
    judge: `math_answers.check_answer` judge.
    progress: Show a tqdm bar.
    mesh: Optional device mesh: parameters sharded, rows split along its batch axes.

  Returns:
    (summary, samples): `metrics.summarize` output plus timing, and one dict per sample.
  """
  import tqdm  # pylint: disable=import-outside-toplevel

  from codi_jax.decoding import bucket  # pylint: disable=import-outside-toplevel
  from soft_jax import decode, math_answers  # pylint: disable=import-outside-toplevel

  if n_samples < 1:
    raise InputError(f"--n_samples: must be >= 1, got {n_samples}")
  if batch_size < 1:
    raise InputError(f"--batch_size: must be >= 1, got {batch_size}")
  if max_new_tokens < 1:
    raise InputError(f"--max_new_tokens: must be >= 1, got {max_new_tokens}")
  if length_bucket < 1:
    raise InputError(f"--length_bucket: must be >= 1, got {length_bucket}")
  params = params.validate(prefix="--", vocab=model.cfg.vocab_size)
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
  dec = decode.SoftDecoder(
    model, params, pad_id=pad, eos_ids=tokenizer.eos_ids, think_end_id=think_end_id, mesh=mesh
  )
  ids = [prompt_ids(tokenizer, p.question, think_end_id) for p in problems]
  width = bucket(max(len(i) for i in ids), length_bucket)  # one prompt shape for every batch
  rows = [(pi, s) for pi in range(len(problems)) for s in range(n_samples)]
  results: list[Any] = []
  t0 = time.perf_counter()
  bar = tqdm.tqdm(
    total=len(rows),
    desc=f"evaluate {params.mode}",
    unit="sample",
    disable=not progress,
    file=sys.stderr,
  )
  for start in range(0, len(rows), batch_size):
    chunk = rows[start : start + batch_size]
    sids = [pi * n_samples + s for pi, s in chunk]
    sids += [0] * (batch_size - len(chunk))
    results += dec(
      [ids[pi] for pi, _ in chunk],
      max_new_tokens=max_new_tokens,
      seed=seed,
      sample_ids=sids,
      length_bucket=width,
      batch=batch_size,
    )
    bar.update(len(chunk))
  bar.close()
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
  from soft_jax import metrics  # pylint: disable=import-outside-toplevel

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
  with exit_on_input_error("soft_jax.evaluate"):
    st = cli_common.settings(default_mode="soft")
    if not _DATA.value:
      raise InputError("--data: no problem file given")
    if not _OUT.value:
      raise InputError("--out: no output directory given")
    if _N_SAMPLES.value < 1:
      raise InputError(f"--n_samples: must be >= 1, got {_N_SAMPLES.value}")
    ks = parse_ks(_K.value or [], _N_SAMPLES.value)
    from codi_jax.models import loader  # pylint: disable=import-outside-toplevel
    from soft_jax import decode, problems  # pylint: disable=import-outside-toplevel

    probs = problems.read_problems(
      _DATA.value,
      layout=_LAYOUT.value,
      question_field=_QUESTION_FIELD.value,
      answer_field=_ANSWER_FIELD.value,
      id_field=_ID_FIELD.value,
      limit=_LIMIT.value,
    )
    loaded = loader.load(st.model, dtype=st.dtype, param_dtype=st.dtype)
    end_id = decode.resolve_think_end(loaded.tokenizer, st.think_end, last_id=st.think_end_last_id)
    summary, samples = evaluate(
      loaded.model,
      loaded.tokenizer,
      probs,
      st.params,
      n_samples=_N_SAMPLES.value,
      ks=ks,
      max_new_tokens=st.max_new_tokens,
      batch_size=_BATCH.value,
      seed=st.seed,
      think_end_id=end_id,
      length_bucket=st.length_bucket,
      judge=_JUDGE.value,
      progress=_PROGRESS.value,
      mesh=st.mesh,
    )
    import jax  # pylint: disable=import-outside-toplevel

    summary["settings"] = {
      "model": st.model,
      "mode": st.mode,
      "data": _DATA.value,
      "layout": _LAYOUT.value,
      "n_samples": _N_SAMPLES.value,
      "k": ks,
      "limit": _LIMIT.value,
      "batch_size": _BATCH.value,
      "max_new_tokens": st.max_new_tokens,
      "dtype": st.dtype,
      "seed": st.seed,
      "think_end_id": end_id,
      "judge": _JUDGE.value,
      "sampler": st.params.to_dict(),
      "device": str(jax.devices()[0].device_kind),
      "host": platform.node(),
    }
    write_outputs(_OUT.value, summary, samples)
  print(
    json.dumps(
      {
        k: summary[k]
        for k in (
          "problems",
          "samples",
          "pass@1",
          "pass@k",
          "mean_thinking_tokens",
          "mean_completion_tokens",
        )
      }
    )
  )


if __name__ == "__main__":
  app.run(main)
