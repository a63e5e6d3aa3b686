r"""One CODI training step: codi_jax vs the PyTorch reference, same run, same weights, same batch.

  python benchmarks/codi_step.py [--steps=10] [--warmup=2] [--batch=8] [--threads=0] [--breakdown]
  python benchmarks/codi_step.py --threads=1,2     # one run per thread count, then one summary

The tiny config of issue 3: GPT-2 architecture, 2 layers, d=128, 4 heads, GPT-2 vocabulary plus
pad/bot/eot (50260 rows, random weights), question 64 / CoT 24 / answer 6 tokens, 6 continuous
thoughts, LoRA r=128 alpha=32 on c_attn/c_proj/c_fc, f32. A step is loss + backward + clipping +
AdamW + schedule, with dropout 0.1 as in training.

Ours is the step `codi_jax.train_lib.train_and_evaluate` builds (build_model, split_trainable,
make_optimizer, make_train_step on a batch from the data pipeline's `collate`, whose labelled
window makes the teacher's LM head run on CoT + answer positions only). The
reference (`benchmarks/_torch_codi.py`) follows the official forward: Python loop of one-token
latent passes over `past_key_values`, a second no-grad teacher pass, a per-step debug softmax; a
"lean" variant without the last two is timed too. Both start from the same weights (ours copied
into torch) and the script first checks that they give the same losses (dropout off). Timed steps
alternate between implementations so all see the same machine load; the table gives the median and
p10-p90 over --steps timed steps after --warmup untimed ones. Prints numbers; never asserts a speed.
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
from codi_jax.data.codi_batches import Shapes, collate
from codi_jax.models import hf
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
flags.DEFINE_bool("ours_separate", True, "also time ours with separate_teacher_target_pass=True")
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
OURS = "ours (codi_jax, jitted step)"


class _VocabOnlyTokenizer:
  """What `build.build_model` needs from a tokenizer for a from-scratch model."""

  vocab_size = VOCAB
  eos_id = EOS

  def add_special_tokens(self, tokens):
    return list(range(VOCAB, VOCAB + len(tokens)))


def make_config(dropout: float):
  """configs/base.py (reference optimiser settings) with the tiny model and LoRA r128."""
  config = base.get_config()
  m = config.model
  m.arch, m.vocab_size, m.num_layers, m.d_model, m.num_heads = "gpt2", VOCAB, LAYERS, D, HEADS
  m.d_ff, m.max_positions, m.dropout = 4 * D, 1024, dropout
  m.lora_rank, m.lora_alpha, m.lora_dropout = LORA_RANK, LORA_ALPHA, dropout
  config.codi.num_latent = NUM_LATENT
  config.optim.num_steps = SCHEDULE_STEPS
  return config


def make_batch(batch: int, special, seed: int) -> dict:
  """A fixed-shape batch made by the data pipeline's own `collate` (full-length rows)."""
  rng = np.random.default_rng(seed)
  examples = [
    {
      "question": rng.integers(0, VOCAB, Q_LEN),
      "cot": rng.integers(0, VOCAB, COT_LEN),
      "answer": np.array([*ANSWER_PROMPT, int(rng.integers(15, 50)), EOS]),
      "distill": len(ANSWER_PROMPT) - 1,
      "index": i,
    }
    for i in range(batch)
  ]
  shapes = Shapes(
    question=Q_LEN + 1,
    teacher=Q_LEN + COT_LEN + ANS_LEN,
    decoder=ANS_LEN + 1,
    teacher_span=COT_LEN + ANS_LEN,
  )
  out = collate(examples, shapes, special)
  out.pop("index")
  return out


def export_weights(codi):
  """Our parameters as (HF GPT-2 base tensors, LoRA (A, B) per HF module, prj arrays)."""
  tensors = hf.export_tensors(codi.backbone)
  lora = {}
  for i, blk in enumerate(codi.backbone.blocks):
    for ours, theirs in HF_MODULE.items():
      lin = getattr(blk, ours)
      lora[f"h.{i}.{theirs}"] = (np.asarray(lin.lora_a[...]), np.asarray(lin.lora_b[...]))
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
    tx, _ = train_step.make_optimizer(config, SCHEDULE_STEPS)
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


def report(res, ours, parity, n_train, n_torch, threads, loads):
  """Prints machine, protocol, step-0 parity and the table."""
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
    f"steps, then {FLAGS.steps} timed, implementations interleaved step by step\n"
  )

  print("step-0 losses, identical weights and batch, dropout off:")
  for k, (a, b) in parity.items():
    print(f"  {k:<11} ours {a:.6f}  torch {b:.6f}  |diff| {abs(a - b):.1e}")
  worst = max(abs(a - b) for a, b in parity.values())
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
  if first == REFERENCE:
    ratio = res[REFERENCE]["median"] / res[OURS]["median"]
    ratio10 = res[REFERENCE]["p10"] / res[OURS]["p10"]
    print(
      f"\ntarget (issue 3), ours >= 4x faster than the reference: "
      f"{'MET' if ratio >= 4 else 'NOT MET'} ({ratio:.2f}x on medians, {ratio10:.2f}x on p10)"
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
  print("\nsummary (one process per thread count, same flags):")
  print("threads | reference ms | ours ms | x reference (median) | (p10) | load start-end")
  for r in rows:
    print(
      f"{r['threads']:>7} | {r['reference_ms']:>12.1f} | {r['ours_ms']:>7.1f} | "
      f"{r['ratio']:>19.2f}x | {r['ratio_p10']:>4.2f}x | {r['loads'][0]:.1f}-{r['loads'][1]:.1f}"
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
  for i, blk in enumerate(codi.backbone.blocks):
    for j, name in enumerate(HF_MODULE):
      lin = getattr(blk, name)
      k = jax.random.fold_in(key, 10 * i + j)
      lin.lora_b.set_value(0.02 * jax.random.normal(k, lin.lora_b.shape))
  batch_np = make_batch(FLAGS.batch, special, FLAGS.seed)
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  tbatch = {
    k: torch.from_numpy(v) if v.dtype == bool else torch.from_numpy(v).long()
    for k, v in batch_np.items()
  }

  # Step-0 parity: same weights, same batch, dropout off (ours: rng None; torch: eval mode).
  weights = export_weights(codi)
  official = make_reference(config, official=True)
  official.load_from_ours(*weights)
  gd, ts0, fr0 = split_trainable(codi, extra=("prj",))
  opts = CodiOptions.from_config(config.codi)
  ours_m = jax.jit(lambda ts, fr, b: codi_loss(nnx.merge(gd, ts, fr), b, opts)[1])(ts0, fr0, batch)
  theirs_m = official.losses(tbatch)
  parity = {
    k: (float(ours_m[k]), theirs_m[k]) for k in ("ce_student", "ce_teacher", "distill", "loss")
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
  if FLAGS.ours_separate:
    ours["ours, separate_teacher_target_pass=True"] = Ours(
      codi, config, batch, drop, separate_teacher_target_pass=True
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
  report(res, ours, parity, n_train, n_torch, threads, loads)
  print(f"total runtime {time.perf_counter() - t_start:.0f} s")
  if FLAGS.summary_json and REFERENCE in res:
    summary = {
      "threads": threads,
      "reference_ms": res[REFERENCE]["median"],
      "ours_ms": res[OURS]["median"],
      "ratio": res[REFERENCE]["median"] / res[OURS]["median"],
      "ratio_p10": res[REFERENCE]["p10"] / res[OURS]["p10"],
      "loads": loads,
    }
    with open(FLAGS.summary_json, "w", encoding="utf-8") as f:
      json.dump(summary, f)


if __name__ == "__main__":
  app.run(main)
