r"""What does CODI's distillation target carry? Probes of the hidden states at the distilled token.

  python experiments/distill_probe.py --workdir=/tmp/toy/codi_s11 --out=/tmp/toy/distill_probe.json

On the test split of a finished run's built-in task, for every hidden-state entry (0 = embeddings,
L = after the final norm) at the distilled token (the one whose next prediction is the answer's
first token), this measures:

- answer decodability: a ridge-regression linear probe (one-hot answer targets, closed form, fitted
  on half the problems, scored on the other half) from the teacher's state, from the student's
  state, and, as a floor, from the teacher's state at the question's last token (before any CoT);
- how much the target varies across problems: the teacher's mean pairwise cosine similarity and
  the share of its variance between problems (1 - within-answer variance / total);
- how far the student is from it: the per-layer distillation loss of the training objective
  (SmoothL1 / teacher std, as `codi_loss`) on the test problems.

Prints a table and writes JSON. The numbers explain, layer by layer, whether the target holds the
answer (then the student's CE already asks for it) or holds something the student cannot reach.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codi_jax import final, runtime  # noqa: E402
from codi_jax.codi.model import CodiOptions, distill_terms, student_forward, teacher_forward  # noqa: E402
from codi_jax.data import codi_batches, readers, synthetic  # noqa: E402
from codi_jax.errors import InputError, exit_on_input_error  # noqa: E402
from codi_jax.files import write_json  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished CODI run (codi_jax.train).")
_OUT = flags.DEFINE_string("out", None, "Output JSON (default: <workdir>/distill_probe.json).")
_N = flags.DEFINE_integer("n", 512, "Test problems.")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size of the forward passes.")


def _gather(h_BxLxD, idx_B):
  return jnp.take_along_axis(h_BxLxD, idx_B[:, None, None], axis=1)[:, 0]


def hidden_at_distill(run, batch, question_last_B, num_latent: int):
  """[J, B, D] stacks: the teacher's and the student's states at the distilled token, and the
  teacher's state at the question's last token."""
  opts = dataclasses.replace(CodiOptions.from_config(run.config.codi), num_latent=num_latent)

  @jax.jit
  def fn(b, q_last):
    tea = teacher_forward(run.codi, b, logits="none")
    stu = student_forward(run.codi, b, opts)
    t = [_gather(h, b["teacher_distill_index"]) for h in tea.hidden_states]
    s = [_gather(h, b["decoder_distill_index"]) for h in stu.hidden_states]
    q = [_gather(h, q_last) for h in tea.hidden_states]
    return jnp.stack(t), jnp.stack(s), jnp.stack(q)

  return fn(batch, question_last_B)


def ridge_probe(x_NxD, labels_N, lam: float = 1e-2) -> float:
  """Held-out accuracy of a closed-form ridge probe onto one-hot labels (first half fits)."""
  classes, y = np.unique(labels_N, return_inverse=True)
  n = len(y) // 2
  x = (x_NxD - x_NxD[:n].mean(0)) / (x_NxD[:n].std(0) + 1e-6)
  x = np.concatenate([x, np.ones((len(x), 1))], 1)
  onehot = np.eye(len(classes))[y]
  a = x[:n].T @ x[:n] + lam * n * np.eye(x.shape[1])
  w = np.linalg.solve(a, x[:n].T @ onehot[:n])
  return float(np.mean(np.argmax(x[n:] @ w, 1) == y[n:]))


def spread(x_NxD, labels_N) -> tuple[float, float]:
  """(mean pairwise cosine similarity, share of variance between answers) of states [N, D]."""
  unit = x_NxD / (np.linalg.norm(x_NxD, axis=1, keepdims=True) + 1e-9)
  cos = unit @ unit.T
  n = len(x_NxD)
  mean_cos = float((cos.sum() - n) / (n * (n - 1)))
  total = np.var(x_NxD, axis=0).sum()
  within = 0.0
  for v in np.unique(labels_N):
    rows = x_NxD[labels_N == v]
    within += np.var(rows, axis=0).sum() * len(rows)
  return mean_cos, float(1.0 - within / (n * total + 1e-12))


def main(argv):
  del argv
  runtime.setup_cli()
  with exit_on_input_error("experiments/distill_probe.py"):
    if not _WORKDIR.value:
      raise InputError("--workdir: required (a finished run)")
    run = final.load_final(_WORKDIR.value)
    config = run.config
    if config.data.source != "synthetic":
      raise InputError(f"{_WORKDIR.value}: a run on the built-in task is needed")
    s = config.data.synthetic
    diff = synthetic.Difficulty.from_config(s.to_dict())
    recs = synthetic.generate("test", min(_N.value, s.test), seed=config.seed, difficulty=diff)
    recs, _ = readers.prepare_train_records(
      recs,
      kind="aug",
      include_last_cot=config.data.include_last_cot,
      keep_non_digit_answers=config.data.keep_non_digit_answers,
    )
    sp = run.special
    examples, _ = codi_batches.tokenize_records(
      recs,
      run.tokenizer,
      pad_id=sp.pad,
      bot_id=sp.bot,
      eot_id=sp.eot,
      distill_offset=codi_batches.infer_distill_offset(run.tokenizer),
      max_token_num=None,
    )
    shapes = codi_batches.fit_shapes(examples, config.data.buckets)
    num_latent = CodiOptions.from_config(config.codi, inference=True).num_latent
    t_parts, s_parts, q_parts = [], [], []
    B = _BATCH.value
    for start in range(0, len(examples), B):
      rows = [examples[i % len(examples)] for i in range(start, start + B)]
      batch = codi_batches.collate(rows, shapes, examples.ids)
      batch.pop("index")
      q_last = np.asarray([len(r["question"]) - 1 for r in rows], np.int32)
      t, st, q = jax.device_get(hidden_at_distill(run, batch, q_last, num_latent))
      keep = min(B, len(examples) - start)
      t_parts.append(t[:, :keep])
      s_parts.append(st[:, :keep])
      q_parts.append(q[:, :keep])
    tea, stu, bare = (np.concatenate(p, 1).astype(np.float64) for p in (t_parts, s_parts, q_parts))
    answers = np.asarray([int(recs[i]["answer"]) for i in examples.record_index])
    kd = np.asarray(
      distill_terms(list(stu.astype(np.float32)), list(tea.astype(np.float32)), "smooth_l1", True)
    )
    rows = []
    for j in range(tea.shape[0]):
      cos, between = spread(tea[j], answers)
      rows.append(
        {
          "entry": j,
          "probe_teacher": ridge_probe(tea[j], answers),
          "probe_student": ridge_probe(stu[j], answers),
          "probe_question_end": ridge_probe(bare[j], answers),
          "teacher_mean_cos": cos,
          "teacher_between_answer_var": between,
          "distill_loss": float(kd[j]),
        }
      )
    chance = float(np.max(np.bincount(answers)) / len(answers))
    out = {
      "workdir": _WORKDIR.value,
      "problems": len(answers),
      "distinct_answers": int(len(np.unique(answers))),
      "majority_answer_rate": chance,
      "include_last_cot": bool(config.data.include_last_cot),
      "num_latent": num_latent,
      "beta": float(config.codi.beta),
      "entries": rows,
    }
    path = _OUT.value or os.path.join(_WORKDIR.value, "distill_probe.json")
    write_json(path, out)
  print(f"{len(answers)} test problems, {out['distinct_answers']} answers, majority {chance:.3f}")
  print("entry | probe teacher | probe student | probe question end | teacher cos | between | KD")
  for r in rows:
    print(
      f"{r['entry']:>5} | {r['probe_teacher']:>13.3f} | {r['probe_student']:>13.3f} | "
      f"{r['probe_question_end']:>17.3f} | {r['teacher_mean_cos']:>11.3f} | "
      f"{r['teacher_between_answer_var']:>7.3f} | {r['distill_loss']:.3f}"
    )


if __name__ == "__main__":
  app.run(main)
