r"""Analyses of Soft Thinking (docs/soft_thinking.md, analyses), each writing CSV/JSON + PNG.

  python -m soft_jax.analyze js_probe --config=configs/soft/smollm2.py --steps=64 --out=/tmp/sa
  python -m soft_jax.analyze logit_lens --config=configs/soft/smollm2.py --steps=16 --out=/tmp/sa
  python -m soft_jax.analyze rouge --config=configs/soft/smollm2.py --max_new_tokens=64 --out=/tmp/sa
  python -m soft_jax.analyze randomness --config=configs/soft/smollm2.py --steps=32 --out=/tmp/sa

Prompts: --prompt (repeatable), else the first --limit problems of --data, else four built-in math
questions; each goes through the chat template with the math instruction (as `soft_jax.evaluate`).

js_probe (8.2): a soft trace of --steps steps (every step a thinking step: no Cold Stop, no
`</think>`); at each step the current concept token (idx, w) and its two counterfactuals, one-hot
idx[0] and one-hot idx[1] (idx[0] when w[1] = 0), run as one batch of 3B rows at the same position
on the same cache (the cache tiled 3x; the trajectory keeps the soft rows' cache). P = softmax(z/T)
over the full vocabulary before filtering, T the thinking temperature; logs JS(P1, Pst),
JS(P2, Pst), JS(P1, P2) per step. A row's steps end before its first EOS trace token: the EOS step
and every later one are left out of the CSV, the statistics and the plot. Writes js_probe.csv,
js_probe.json, js_probe.png.

logit_lens (8.3): along the greedy trace, at each step with top-2 tokens t1, t2 of the next-token
distribution, feed alpha E[t1] + (1 - alpha) E[t2] (alpha = --lens_alpha, 0.6), E[t1] and E[t2] at
the same position on the same cache; at every layer project the hidden state to the vocabulary
(final norm if --lens_norm, then the LM head) and measure |top5(single) & top10(mix)| / 5 for both
single runs. Branching points: steps with p(t2) >= --lens_min_p2 (T = 1). Writes logit_lens.csv,
logit_lens.json, logit_lens.png.

rouge (8.4): ROUGE-L (LCS; precision, recall, F1) of each mode's trace (soft = per-step top-1 of
the concept tokens; sample = token sampling at the thinking temperature; dirichlet / gumbel
likewise; all thinking, no phase switch) against the greedy trace of the same prompt, at two
levels: token ids, and words (the trace decoded with skip_special_tokens=True, then split on runs
of whitespace; case and punctuation kept). Every trace, greedy included, is the first
--max_new_tokens tokens cut before its first EOS id (the stop id excluded). --n_samples draws per
stochastic mode. Writes rouge.csv, rouge.json, rouge.png.

randomness (8.1): from the filtered candidate distributions q of a soft trace (--steps steps per
prompt), st = the vanilla concept token (top-K of q, renormalised) and st' = its noised version,
Dirichlet for each gamma in --gammas or Gumbel-Softmax for each tau in --taus (--draws draws per
step). randomness = JS(st', st) on probabilities (the reference applied a softmax to st' first:
--js_legacy_softmax reproduces it, for comparison only); softness = entropy of st'. Writes
randomness.csv, randomness.json, randomness.png.

--out is checked before anything is read or loaded (a directory it can create and write). Each
analysis writes its JSON last, with what it was computed from (model, settings, prompts): a rerun
with the same settings keeps a complete result, one with other settings is refused in one line
naming what differs, and --overwrite replaces it. An analysis is one trace, with nothing to resume:
Ctrl-C ends with one line and exit status 130 (rerun the command; a result without its JSON is
not complete).
"""
# pylint: disable=invalid-name

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence

from absl import app, flags

from codi_jax import files, results, runtime
from codi_jax.errors import InputError, exit_on_input_error
from codi_jax.models import loader
from soft_jax import analyses, cli_common, problems

ANALYSES = ("js_probe", "logit_lens", "rouge", "randomness")
DEFAULT_QUESTIONS = (
  (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
  ),
  (
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total "
    "does it take?"
  ),
  "What is the sum of all positive divisors of 36?",
  "If 3x + 7 = 22, what is the value of x?",
)

PROG = "soft_jax.analyze"


def _define_flags():
  """This program's flags (defined only when run as a program: importing defines none)."""
  cli_common.define("decode", "sampler", "prompt", "data", "samples", "output")
  flags.DEFINE_integer("steps", 64, "Soft steps per prompt (js_probe, logit_lens, randomness).")
  flags.DEFINE_float("lens_alpha", 0.6, "logit_lens: weight of t1 in the mixture.")
  flags.DEFINE_bool("lens_norm", True, "logit_lens: final norm before the LM head.")
  flags.DEFINE_float("lens_min_p2", 0.1, "logit_lens: branching point if p(t2) >= this.")
  flags.DEFINE_list(
    "rouge_modes", ["soft", "sample", "dirichlet", "gumbel"], "rouge: modes compared with greedy."
  )
  flags.DEFINE_list(
    "gammas", ["0.25", "0.5", "1", "2", "4", "8", "16", "64"], "randomness: Dirichlet gammas."
  )
  flags.DEFINE_list(
    "taus", ["0.1", "0.3", "0.5", "0.7", "0.9", "1.5", "3"], "randomness: Gumbel temperatures."
  )
  flags.DEFINE_integer("draws", 8, "randomness: noise draws per step.")
  flags.DEFINE_bool(
    "js_legacy_softmax", False, "randomness: JS(softmax(st'), st), the reference's bug."
  )


# ---------------------------------------------------------------------------------------------
# CLI


def _floats(values: Sequence[str], flag: str, positive: bool = True) -> list[float]:
  out = []
  for v in values:
    try:
      x = float(v)
    except ValueError:
      raise InputError(f"{flag}: expected numbers, got {v!r}") from None
    if not math.isfinite(x) or (positive and x <= 0):
      raise InputError(f"{flag}: values must be finite and > 0, got {v!r}")
    out.append(x)
  if not out:
    raise InputError(f"{flag}: no value given")
  return out


def _texts() -> list[str]:
  v = cli_common.value
  if v("prompt"):
    return list(v("prompt"))
  if v("data"):
    probs = problems.read_problems(
      v("data"),
      layout=v("layout"),
      question_field=v("question_field"),
      answer_field=v("answer_field"),
      id_field=v("id_field"),
      limit=v("limit") or 4,
    )
    return [p.question for p in probs]
  return list(DEFAULT_QUESTIONS[: v("limit") or len(DEFAULT_QUESTIONS)])


def _identity(name: str, st, texts: Sequence[str], source: str) -> dict:
  """What analysis `name`'s result depends on: a rerun keeps it only if this matches."""
  v = cli_common.value
  own = {
    "js_probe": ("steps",),
    "logit_lens": ("steps", "lens_alpha", "lens_norm", "lens_min_p2"),
    "rouge": ("rouge_modes", "n_samples", "max_new_tokens"),
    "randomness": ("steps", "gammas", "taus", "draws", "js_legacy_softmax"),
  }[name]
  settings = {k: v(k) for k in own}
  if "max_new_tokens" in settings:
    settings["max_new_tokens"] = st.max_new_tokens
  if name != "logit_lens":  # the greedy trace has no sampler
    settings.update(seed=st.seed, sampler=st.params.to_dict())
  return {
    "analysis": name,
    "model": {"spec": st.model, "dtype": st.dtype, "files": results.fingerprint(source)},
    "settings": settings,
    "prompts": results.digest(list(texts)),
  }


def main(argv):
  runtime.setup_cli()
  with results.exit_on_interrupt(PROG), exit_on_input_error(PROG):
    _analyze(argv)


def _analyze(argv):
  v = cli_common.value
  if len(argv) != 2 or argv[1] not in ANALYSES:
    raise InputError(
      f"expected one analysis, one of {', '.join(ANALYSES)}; got {' '.join(argv[1:]) or 'none'}"
    )
  name = argv[1]
  st = cli_common.settings(default_mode="soft", prog=PROG)
  if st.mesh is not None:
    raise InputError("--mesh: the analyses run on one device (they are probes of a small model)")
  out_dir = v("out")
  if not out_dir:
    raise InputError("--out: no output directory given")
  if v("steps") < 1:
    raise InputError(f"--steps: must be >= 1, got {v('steps')}")
  if not 0 <= v("lens_alpha") <= 1:
    raise InputError(f"--lens_alpha: must be in [0, 1], got {v('lens_alpha')}")
  if v("draws") < 1:
    raise InputError(f"--draws: must be >= 1, got {v('draws')}")
  if v("n_samples") < 1:
    raise InputError(f"--n_samples: must be >= 1, got {v('n_samples')}")
  gammas = _floats(v("gammas") or [], "--gammas")
  taus = _floats(v("taus") or [], "--taus")
  out_dir = results.check_out(out_dir)  # before any prompt is read or model loaded
  texts = _texts()

  loaded = loader.load(st.model, dtype=st.dtype, param_dtype=st.dtype)
  identity = _identity(name, st, texts, loaded.source)
  kept = results.read_complete(
    os.path.join(out_dir, f"{name}.json"), identity, overwrite=v("overwrite")
  )
  if kept is not None:
    print(
      f"kept the complete {name} result in {out_dir} (--overwrite recomputes it)", file=sys.stderr
    )
    summary = kept
  else:  # an old result (--overwrite) stops counting as complete before its files are redone
    files.as_path(out_dir).joinpath(f"{name}.json").unlink(missing_ok=True)
    summary = _run(name, loaded, st, texts, out_dir, gammas, taus, identity)
  summary = {k: x for k, x in summary.items() if k not in ("per_prompt", "points", "identity")}
  print(json.dumps(summary)[:4000])
  sys.stdout.flush()


def _run(name, loaded, st, texts, out_dir, gammas, taus, identity) -> dict:
  """Runs analysis `name`; its files are written with its summary last."""
  v = cli_common.value
  model, tok = loaded.model, loaded.tokenizer
  params = st.params.validate(prefix="--", vocab=loaded.config.vocab_size)
  common = {"out_dir": out_dir, "identity": identity}
  if name == "js_probe":
    return analyses.run_js_probe(
      model, tok, texts, params, steps=v("steps"), seed=st.seed, **common
    )
  if name == "logit_lens":
    return analyses.run_logit_lens(
      model,
      tok,
      texts,
      steps=v("steps"),
      alpha=v("lens_alpha"),
      norm=v("lens_norm"),
      min_p2=v("lens_min_p2"),
      **common,
    )
  if name == "rouge":
    return analyses.run_rouge(
      model,
      tok,
      texts,
      params,
      modes=v("rouge_modes"),
      max_new=st.max_new_tokens,
      n_samples=v("n_samples"),
      seed=st.seed,
      **common,
    )
  sp = params.replace(mode="soft")
  trace = analyses.probe_trace(model, tok, texts, sp, steps=v("steps"), seed=st.seed)
  top_z = trace["top_z"].reshape(-1, trace["top_z"].shape[-1])
  return analyses.run_randomness(
    top_z,
    sp,
    gammas=gammas,
    taus=taus,
    draws=v("draws"),
    seed=st.seed,
    legacy_softmax=v("js_legacy_softmax"),
    **common,
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
