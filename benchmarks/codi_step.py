r"""One CODI training step: codi_jax vs the PyTorch reference, same run, same weights, same rows.

  python benchmarks/codi_step.py [--steps=10] [--warmup=2] [--batch=8] [--threads=0] [--breakdown]
  python benchmarks/codi_step.py --threads=1,2     # one run per thread count, then one summary
  python benchmarks/codi_step.py --threads=1,2 --max_padding=0   # the earlier 96/96/32 shapes

The tiny config of issue 3: GPT-2 architecture, 2 layers, d=128, 4 heads, GPT-2 vocabulary plus
pad/bot/eot (50260 rows, random weights), question 64 / CoT 24 / answer 6 tokens, 6 continuous
thoughts, LoRA r=128 alpha=32 on c_attn/c_proj/c_fc, f32. A step is loss + backward + clipping +
AdamW + schedule, with dropout 0.1 as in training.

Ours is the step `codi_jax.train_lib.train_and_evaluate` builds (build_model, split_trainable,
make_optimizer, make_train_step) in reproduction mode (`configs/base.py::reproduction`, what
configs/gpt2.py runs: official padding, separate teacher target pass), on the first batch of the
training pipeline (`pipeline.examples_data`: the config's `data.buckets` / `data.max_padding`
shapes, the teacher's labelled window) over examples of those fixed lengths. The reference
(`benchmarks/_torch_codi.py`) gets the same rows at their own maxima, as the official collator pads
(every example has the same lengths, so these are the exact 65/94/7 shapes); ours is also timed at
those exact shapes, and with our fixes (masked padding, one teacher pass). The reference follows the
official forward: Python loop of one-token latent passes over `past_key_values`, a second no-grad
teacher pass, a per-step debug softmax; a "lean" variant without the last two is timed too. All
start from the same weights (ours copied into torch) and the script first checks that they give the
same losses (dropout off). Timed steps alternate between implementations so all see the same
machine load; the table gives the median and p10-p90 over --steps timed steps after --warmup
untimed ones. Prints numbers; never asserts a speed.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags
from flax import nnx

# configs/ and benchmarks/ import from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from benchmarks import _torch_codi
from codi_jax import train_step
from codi_jax.codi import build
from codi_jax.codi.model import CodiOptions, codi_loss
from codi_jax.data import codi_batches, pipeline
from codi_jax.models import hf, layout
from codi_jax.models.params import split_trainable
from configs import base

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 10, "timed steps per implementation (median reported)")
flags.DEFINE_integer("warmup", 2, "untimed steps per implementation first (ours: after compiling)")
flags.DEFINE_integer("batch", 8, "batch size")
flags.DEFINE_list(
  "threads",
  ["0"],
  "cores (0: all available); pins the process, sets torch threads. Several (1,2): one subprocess "
  "per value (XLA sizes its thread pool once per process), then a summary of the ratios",
)
flags.DEFINE_string("summary_json", "", "write the medians and ratio here (used by --threads=a,b)")
flags.DEFINE_float("dropout", 0.1, "GPT-2 and LoRA dropout in the timed steps (reference: 0.1)")
flags.DEFINE_bool("reference", True, "time the PyTorch reference (off: ours only, for profiling)")
flags.DEFINE_bool("lean_torch", True, "also time the reference: 1 teacher pass, no debug softmax")
flags.DEFINE_bool("exact", True, "also time ours at the exact shapes (the reference's)")
flags.DEFINE_bool("ours_fixes", True, "also time our fixes: masked padding, one teacher pass")
flags.DEFINE_integer("buckets", None, "pipeline data.buckets (default: configs/base.py's)")
flags.DEFINE_float(
  "max_padding", None, "pipeline data.max_padding (default: configs/base.py's; 0: earlier rule)"
)
flags.DEFINE_bool("breakdown", False, "also time our teacher-only and student-only steps")
flags.DEFINE_string("torch_attn", "sdpa", "reference's HF attention implementation (sdpa|eager)")
flags.DEFINE_integer("seed", 0, "weights and batch seed")

VOCAB = 50257  # GPT-2; +3 rows for pad/bot/eot
LAYERS, D, HEADS = 2, 128, 4
Q_LEN, COT_LEN, ANS_LEN = 64, 24, 6
NUM_LATENT = 6
LORA_RANK, LORA_ALPHA = 128, 32.0
ANSWER_PROMPT = (464, 3280, 318, 25)  # GPT-2 ids of "The answer is:"; then a value token and eos
EOS = 50256
SCHEDULE_STEPS = 1000  # optimizer schedule length, same on both sides (irrelevant to timing)
HF_MODULE = {
  "c_attn": "attn.c_attn",
  "attn_c_proj": "attn.c_proj",
  "c_fc": "mlp.c_fc",
  "mlp_c_proj": "mlp.c_proj",
}
REFERENCE = "PyTorch reference (official forward)"
REFERENCE_LEAN = "PyTorch reference, lean (1 teacher pass, no stats softmax)"
OURS = "ours, reproduction mode, pipeline shapes"
OURS_EXACT = "ours, reproduction mode, exact shapes"
OURS_FIXES = "ours, our fixes (masked, 1 teacher pass), pipeline shapes"


class _VocabOnlyTokenizer:
  """What `build.build_model` needs from a tokenizer for a from-scratch model."""

  vocab_size = VOCAB
  eos_id = EOS

  def token_to_id(self, token):  # holds no special tokens: build adds pad/bot/eot after VOCAB
    return None

  def add_special_tokens(self, tokens):
    return list(range(VOCAB, VOCAB + len(tokens)))


def make_config(dropout: float):
  """configs/base.py in reproduction mode (reference optimiser settings, official padding, separate
  teacher target pass) with the tiny model and LoRA r128."""
  config = base.reproduction(base.get_config(), ours=False)
  m = config.model
  m.arch, m.vocab_size, m.num_layers, m.d_model, m.num_heads = "gpt2", VOCAB, LAYERS, D, HEADS
  m.d_ff, m.max_positions, m.dropout = 4 * D, 1024, dropout
  m.lora_rank, m.lora_alpha, m.lora_dropout = LORA_RANK, LORA_ALPHA, dropout
  config.codi.num_latent = NUM_LATENT
  config.optim.num_steps = SCHEDULE_STEPS
  if FLAGS.buckets is not None:
    config.data.buckets = FLAGS.buckets
  if FLAGS.max_padding is not None:
    config.data.max_padding = FLAGS.max_padding
  return config


def make_batches(config, batch: int, special, seed: int):
  """(pipeline batch, exact batch, their Shapes): the first batch of the training pipeline
  (`pipeline.examples_data` with the config's buckets, as train_lib calls it) over 4 * batch
  tokenized examples of Q_LEN / COT_LEN / ANS_LEN tokens, and the same rows padded to their own
  maxima as the reference collator pads them (every example has those lengths: the exact shapes)."""
  rng = np.random.default_rng(seed)
  n = 4 * batch
  examples = codi_batches.CodiExamples(
    [rng.integers(0, VOCAB, Q_LEN) for _ in range(n)],
    [rng.integers(0, VOCAB, COT_LEN) for _ in range(n)],
    [np.array([*ANSWER_PROMPT, int(rng.integers(15, 50)), EOS]) for _ in range(n)],
    [len(ANSWER_PROMPT) - 1] * n,
    list(range(n)),
    special,
  )
  data = pipeline.examples_data(
    examples,
    {},
    batch_size=batch,
    seed=seed,
    buckets=config.data.buckets,
    max_padding=config.data.max_padding,
    prefetch=0,
  )
  ours = next(iter(data.dataset))
  rows = [examples[int(i)] for i in ours.pop("index")]
  exact_shapes = codi_batches.fit_shapes(examples, 1)  # bucket 1: the maxima, = each row's lengths
  exact = codi_batches.collate(rows, exact_shapes, special)
  exact.pop("index")
  return ours, exact, data.shapes, exact_shapes


def export_weights(codi):
  """Our parameters as (HF GPT-2 base tensors, LoRA (A, B) per HF module, prj arrays)."""
  tensors = hf.export_tensors(codi.backbone)
  lora = {}
  flat = dict(layout.per_layer(nnx.to_flat_state(nnx.state(codi.backbone, nnx.LoRAParam))))
  for i in range(codi.backbone.cfg.num_layers):  # either parameter layout: per-layer paths
    for ours, theirs in HF_MODULE.items():
      a, b = (np.asarray(flat[("blocks", i, ours, w)]) for w in ("lora_a", "lora_b"))
      lora[f"h.{i}.{theirs}"] = (a, b)
  p = codi.prj
  named = {
    "w1": p.w1,
    "b1": p.b1,
    "w2": p.w2,
    "b2": p.b2,
    "ln_scale": p.ln.scale,
    "ln_bias": p.ln.bias,
  }
  return tensors, lora, {k: np.asarray(v[...]) for k, v in named.items()}


class Ours:
  """The jitted CODI training step of train_lib on one set of parameters (AOT-compiled)."""

  def __init__(self, codi, config, batch, dropout: bool, **options):
    opts = dataclasses.replace(CodiOptions.from_config(config.codi), **options)
    graphdef, train_state, frozen = split_trainable(codi, extra=("prj",))  # train_lib, LoRA path
    self.state = jax.tree.map(jnp.copy, train_state)  # own buffers: the step donates them
    self.frozen, self.batch = frozen, batch
    tx, _ = train_step.make_optimizer(config.optim, SCHEDULE_STEPS)
    self.opt = tx.init(self.state)
    step_fn = train_step.make_train_step(graphdef, tx, jax.random.key(config.seed), opts, dropout)
    t0 = time.perf_counter()
    self.step_fn = step_fn.lower(self.state, self.opt, frozen, batch, jnp.int32(0)).compile()
    self.compile_s = time.perf_counter() - t0
    cost = self.step_fn.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    self.flops = float(cost.get("flops", float("nan")))

  def train_step(self, step: int) -> float:
    self.state, self.opt, m = self.step_fn(
      self.state, self.opt, self.frozen, self.batch, jnp.int32(step)
    )
    return float(jax.block_until_ready(m["loss"]))


def make_reference(config, official: bool) -> _torch_codi.TorchCodi:
  """The torch model with the same sizes, LoRA, prj and optimiser settings as ours."""
  o, p = config.optim, FLAGS.dropout
  hf_cfg = transformers.GPT2Config(
    vocab_size=VOCAB + 3,
    n_positions=config.model.max_positions,
    n_embd=D,
    n_layer=LAYERS,
    n_head=HEADS,
    n_inner=4 * D,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    resid_pdrop=p,
    embd_pdrop=p,
    attn_pdrop=p,
    tie_word_embeddings=True,
  )
  hf_cfg._attn_implementation = FLAGS.torch_attn  # pylint: disable=protected-access
  return _torch_codi.TorchCodi(
    hf_cfg,
    lora_rank=LORA_RANK,
    lora_alpha=LORA_ALPHA,
    lora_dropout=p,
    prj_dim=D,
    lr=o.lr,
    b1=o.b1,
    b2=o.b2,
    eps=o.eps,
    weight_decay=o.weight_decay,
    clip=o.clip,
    warmup_steps=max(1, int(o.warmup_ratio * SCHEDULE_STEPS)),
    total_steps=SCHEDULE_STEPS,
    num_latent=NUM_LATENT,
    official=official,
  )


def time_interleaved(steps: dict, warmup: int, n: int) -> dict:
  """{name: [seconds]}: step i of every implementation, then step i+1, ...; warm-up dropped."""
  times = {name: [] for name in steps}
  for i in range(warmup + n):
    for name, fn in steps.items():
      t0 = time.perf_counter()
      fn(i)
      if i >= warmup:
        times[name].append(time.perf_counter() - t0)
  return times


def stats(times_s) -> dict:
  ms = 1e3 * np.asarray(times_s)
  return {
    "median": float(np.median(ms)),
    "p10": float(np.percentile(ms, 10)),
    "p90": float(np.percentile(ms, 90)),
  }


def shape_text(shapes) -> str:
  return f"{shapes.question}/{shapes.teacher}/{shapes.decoder} (window {shapes.teacher_span})"


def report(res, ours, parity, n_train, n_torch, threads, loads, shapes, data_config):
  """Prints machine, protocol, shapes, step-0 parity and the table."""
  cores = len(os.sched_getaffinity(0))
  print(
    f"\nmachine: {platform.machine()} {os.cpu_count()} cpus ({threads} used) | python "
    f"{platform.python_version()} | jax {jax.__version__} ({jax.devices()[0].platform}) | flax "
    f"{flax.__version__} | torch {torch.__version__} ({torch.get_num_threads()} threads) | "
    f"transformers {transformers.__version__} (attention {FLAGS.torch_attn}) | peft not used"
  )
  busy = max(loads) > 0.75 * max(cores, 1)
  print(
    f"load average (1 min): {loads[0]:.1f} at start, {loads[1]:.1f} at end"
    + ("  ** machine shared/busy: timings noisy **" if busy else "")
  )
  print(
    f"config: GPT-2 arch, {LAYERS} layers, d={D}, {HEADS} heads, vocab {VOCAB}+3, batch "
    f"{FLAGS.batch}, question {Q_LEN}(+bot) / CoT {COT_LEN} / answer {ANS_LEN} tokens, "
    f"{NUM_LATENT} thoughts, LoRA r{LORA_RANK} alpha {LORA_ALPHA:g}, f32, dropout "
    f"{FLAGS.dropout:g}; trainable params ours {n_train:,} / torch {n_torch:,}"
  )
  print(
    f"protocol: loss + backward + clip + AdamW + schedule per step; {FLAGS.warmup} warm-up "
    f"steps, then {FLAGS.steps} timed, implementations interleaved step by step"
  )
  pipe, exact = shapes
  print(
    f"shapes question/teacher/decoder: pipeline {shape_text(pipe)} (data.buckets "
    f"{data_config.buckets}, max_padding {data_config.max_padding:g}; one shape for every batch "
    f"of the run, so the step compiles once per run), exact {shape_text(exact)} (the "
    "reference's batch)\n"
  )

  print("step-0 losses, identical weights and rows, dropout off (ours in reproduction mode):")
  worst = 0.0
  for k, (a, b, c) in parity.items():
    print(f"  {k:<11} ours pipeline {a:.6f}  ours exact {b:.6f}  torch {c:.6f}")
    worst = max(worst, abs(a - c), abs(b - c))
  verdict = "MATCH" if worst < 1e-4 else "MISMATCH"
  print(f"  -> {verdict} (max |diff| {worst:.1e}; tolerance 1e-4)\n")

  first = next(iter(res))
  w = max(len(n) for n in res)
  vs = "reference" if first == REFERENCE else "1st row"
  hdr = (
    f"{'implementation':<{w}} | {'ms/step median':>14} | {'p10-p90 ms':>15} | "
    f"{'steps/s':>7} | {'x ' + vs + ' (median)':>22} | {'(p10)':>6}"
  )
  print(hdr + "\n" + "-" * len(hdr))
  for name, r in res.items():
    print(
      f"{name:<{w}} | {r['median']:>14.1f} | {r['p10']:>7.1f}-{r['p90']:<7.1f} | "
      f"{1e3 / r['median']:>7.2f} | {res[first]['median'] / r['median']:>21.2f}x | "
      f"{res[first]['p10'] / r['p10']:>5.2f}x"
    )
  print("(p10 column: ratio of fastest-decile step times, the closer proxy for an idle machine)")
  unstable = [n for n, r in res.items() if r["p90"] > 2 * r["p10"]]
  if unstable:
    print(
      f"** unstable (p90 > 2 x p10): {'; '.join(unstable)}. torch's OpenMP threads collapse "
      "when the cores are oversubscribed; compare with --threads=1 or on an idle machine **"
    )
  print()
  for name, o in ours.items():
    print(
      f"{name}: compile {o.compile_s:.0f} s; XLA cost analysis {o.flops / 1e9:.1f} GFLOP/step "
      f"= {o.flops / 1e6 / res[name]['median']:.1f} GFLOP/s"
    )
  print("(XLA's cost analysis counts a loop body once: the layer and LM-head scans count low)")
  if first == REFERENCE:
    ratio = res[REFERENCE]["median"] / res[OURS]["median"]
    ratio10 = res[REFERENCE]["p10"] / res[OURS]["p10"]
    print(
      f"\ntarget (issues 3, 20), reproduction mode at the pipeline's shapes >= 4x faster than the "
      f"reference: {'MET' if ratio >= 4 else 'NOT MET'} ({ratio:.2f}x on medians, {ratio10:.2f}x "
      "on p10)"
    )


def run_each_thread_count(counts: list[int]) -> None:
  """Runs this script once per thread count (same flags otherwise) and prints the ratios."""
  rows = []
  passed = [a for a in sys.argv[1:] if not a.startswith(("--threads", "--summary_json"))]
  with tempfile.TemporaryDirectory() as tmp:
    for t in counts:
      out = os.path.join(tmp, f"{t}.json")
      print(f"===== --threads={t} =====", flush=True)
      cmd = [sys.executable, os.path.abspath(__file__), f"--threads={t}", f"--summary_json={out}"]
      subprocess.run(cmd + passed, check=True)
      with open(out, encoding="utf-8") as f:
        rows.append(json.load(f))
  print(
    f"\nsummary (one process per thread count, same flags; reproduction mode; pipeline shapes "
    f"{rows[0]['shapes']}, exact {rows[0]['exact_shapes']}):"
  )
  print(
    "threads | reference ms | ours pipeline ms | x ref (median) | (p10) | ours exact ms | "
    "x ref (median) | load start-end"
  )
  for r in rows:
    exact_ms = r.get("ours_exact_ms", float("nan"))
    print(
      f"{r['threads']:>7} | {r['reference_ms']:>12.1f} | {r['ours_ms']:>16.1f} | "
      f"{r['ratio']:>13.2f}x | {r['ratio_p10']:>4.2f}x | {exact_ms:>13.1f} | "
      f"{r['reference_ms'] / exact_ms:>13.2f}x | {r['loads'][0]:.1f}-{r['loads'][1]:.1f}"
    )


def main(argv):
  del argv
  counts = [int(t) for t in FLAGS.threads]
  if len(counts) > 1:
    run_each_thread_count(counts)
    return
  t_start = time.perf_counter()
  cores = sorted(os.sched_getaffinity(0))
  threads = counts[0] or len(cores)
  if threads < len(cores):
    os.sched_setaffinity(0, cores[:threads])  # before XLA sizes its thread pool; torch too
  torch.set_num_threads(threads)
  transformers.logging.set_verbosity_error()
  warnings.filterwarnings("ignore", message=".*past_key_values.*")  # the reference's 4.52-era API
  load0 = os.getloadavg()[0]

  config = make_config(FLAGS.dropout)
  codi, _, special = build.build_model(config, _VocabOnlyTokenizer())
  # LoRA B starts at 0; random values make the parity check exercise the adapters too.
  key = jax.random.key(FLAGS.seed + 100)
  for j, name in enumerate(HF_MODULE):
    b = getattr(codi.backbone.blocks, name).lora_b  # stacked: [layers, r, out]
    rows = [
      0.02 * jax.random.normal(jax.random.fold_in(key, 10 * i + j), b.shape[1:])
      for i in range(b.shape[0])
    ]
    b.set_value(jnp.stack(rows))
  pipe_np, exact_np, pipe_shapes, exact_shapes = make_batches(
    config, FLAGS.batch, special, FLAGS.seed
  )
  batch = {k: jnp.asarray(v) for k, v in pipe_np.items()}
  exact = {k: jnp.asarray(v) for k, v in exact_np.items()}
  tbatch = {
    k: torch.from_numpy(v) if v.dtype == bool else torch.from_numpy(v).long()
    for k, v in exact_np.items()
  }

  # Step-0 parity: same weights, same batch, dropout off (ours: rng None; torch: eval mode).
  weights = export_weights(codi)
  official = make_reference(config, official=True)
  official.load_from_ours(*weights)
  gd, ts0, fr0 = split_trainable(codi, extra=("prj",))
  opts = CodiOptions.from_config(config.codi)
  losses = jax.jit(lambda ts, fr, b: codi_loss(nnx.merge(gd, ts, fr), b, opts)[1])
  ours_m, ours_exact_m = losses(ts0, fr0, batch), losses(ts0, fr0, exact)
  theirs_m = official.losses(tbatch)
  parity = {
    k: (float(ours_m[k]), float(ours_exact_m[k]), theirs_m[k])
    for k in ("ce_student", "ce_teacher", "distill", "loss")
  }
  n_train = sum(x.size for x in jax.tree.leaves(ts0))
  n_torch = sum(p.numel() for p in official.trainable)

  steps = {}
  if FLAGS.reference:
    steps[REFERENCE] = lambda i: official.train_step(tbatch)
    if FLAGS.lean_torch:
      lean = make_reference(config, official=False)
      lean.load_from_ours(*weights)
      steps[REFERENCE_LEAN] = lambda i: lean.train_step(tbatch)
  drop = FLAGS.dropout > 0
  ours = {OURS: Ours(codi, config, batch, drop)}
  if FLAGS.exact:
    ours[OURS_EXACT] = Ours(codi, config, exact, drop)
  if FLAGS.ours_fixes:
    ours[OURS_FIXES] = Ours(
      codi, config, batch, drop, padding_mode="masked", separate_teacher_target_pass=False
    )
  if FLAGS.breakdown:
    ours["ours, teacher only (method=cot_sft)"] = Ours(codi, config, batch, drop, method="cot_sft")
    ours["ours, student only (no_cot_sft, 6 thoughts)"] = Ours(
      codi, config, batch, drop, method="no_cot_sft"
    )
  steps.update({name: o.train_step for name, o in ours.items()})

  times = time_interleaved(steps, FLAGS.warmup, FLAGS.steps)
  res = {name: stats(t) for name, t in times.items()}
  loads = (load0, os.getloadavg()[0])
  shapes = (pipe_shapes, exact_shapes)
  report(res, ours, parity, n_train, n_torch, threads, loads, shapes, config.data)
  print(f"total runtime {time.perf_counter() - t_start:.0f} s")
  if FLAGS.summary_json and REFERENCE in res:
    summary = {
      "threads": threads,
      "reference_ms": res[REFERENCE]["median"],
      "ours_ms": res[OURS]["median"],
      "ratio": res[REFERENCE]["median"] / res[OURS]["median"],
      "ratio_p10": res[REFERENCE]["p10"] / res[OURS]["p10"],
      "loads": loads,
      "shapes": shape_text(pipe_shapes),
      "exact_shapes": shape_text(exact_shapes),
    }
    if OURS_EXACT in res:
      summary["ours_exact_ms"] = res[OURS_EXACT]["median"]
    with open(FLAGS.summary_json, "w", encoding="utf-8") as f:
      json.dump(summary, f)


if __name__ == "__main__":
  app.run(main)
