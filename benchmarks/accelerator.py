r"""One-command accelerator benchmark: CODI training, greedy and soft decoding at real model shapes.

  python benchmarks/accelerator.py [--out=table.json] [--models=gpt2,llama] [--workloads=...]
  python benchmarks/accelerator.py --smoke       # tiny shapes, same code path (CPU, ~1 minute)
  python benchmarks/accelerator.py --cpu_small   # 2 layers, the real vocabularies (CPU sanity run)
  python benchmarks/accelerator.py --flops_only  # compile the train steps only: XLA FLOPs / formula
  python benchmarks/accelerator.py --attention_impl=cudnn   # cuDNN's fused attention (a GPU)

Runs on `jax.devices()[0]` and prints one table. Models have random weights, GPT-2-small and
Llama-3.2-1B shapes (vocabularies + 3 rows for pad/bot/eot), bf16 weights and compute. Order:
decoding, training, then the probes, with the elapsed time of each section as it ends. Attention
runs `--attention_impl` (`layers.attention`), except GPT-2's training, whose attention dropout only
the einsum path has.

- Train: one CODI step (`train_step.make_train_step`: loss + backward + clipping + AdamW), LoRA
  r=128 alpha 32 on every linear layer + the projection trainable (the reference's setting;
  `--full_ft`: every parameter, f32 master weights), base weights bf16, LoRA dropout 0.1 (GPT-2:
  also embedding/attention/residual dropout 0.1), one teacher pass, full-length rows, one
  micro-batch (no accumulation). Step time is the median of --steps after --warmup; MFU is against
  the bf16 matmul rate measured in the same run (chained 8192^2 matmuls, best of a few).
- Decode: `Generator` (greedy) and `SoftDecoder` (soft thinking, default `SamplerParams`) at each
  batch, random prompts, eos id outside the vocabulary so every row generates every token. tok/s
  over the whole call; decode-only tok/s subtracts a separately timed prefill of the same shapes.
  The bandwidth fraction is bytes per decode step (every weight once, the LM-head table included,
  plus the KV cache at the mean filled length prompt + new/2) x steps / decode time, over the
  bandwidth of a copy probe measured in the same run (read + write of a large array, best of a few).

Model FLOPs per train step (formula), with B rows, and per row Lt = q + c + a teacher tokens,
Lq = q + 1 encoder tokens, N thoughts, La = a + 1 decoder tokens, Lw = c + a teacher logit rows:
  dense     = B (Lt + Lq + N + La) (k P_dense + 6 P_lora), k = 4 under LoRA (forward 2 + input
              gradient 2; frozen weights get no weight gradient), 6 in full fine-tuning
  head      = B (Lw + La) k V D  (tied LM head at the positions the losses read)
  attention = 12 H Dh L S B, S = visible keys summed over queries (causal): Lt(Lt+1)/2 +
              Lq(Lq+1)/2 + sum_j (Lq + j) over thoughts + sum_k (Lq + N + k) over decoder tokens
              (forward 4 H Dh per key, backward twice that)
  prj       = 6 B N (2 D P)  (the trainable projection, once per thought)
i.e. teacher forward + backward, student encoder + thoughts + answer forward + backward. XLA's
count (`compiled.cost_analysis()["flops"]`) is shown next to it: it includes the masked attention
over full blocks and elementwise work, and counts a while-loop body (the thought scan) once.

--flops_only (any preset, any device; CPU is enough) builds the models abstractly, compiles the
same train step without running it and prints, per model and term, the formula next to XLA's
count. The thought scan is corrected by two more compiles: per thought = XLA(N=2) - XLA(N=1), and
corrected = XLA(N) + (N - 2) per thought (`flops_row`). Per term, the dots of the compiled HLO with
each loop's trip count, attributed by source function (`dot_flops`); non-dot = corrected - dots.
The formula lives in `codi_jax.flops` and the HLO readers in `codi_jax.hlo` (shared with
`codi_jax.compile`). Prints numbers; never asserts a speed. One file on purpose (~1000 lines): one
command, and one place for the shapes and the model construction the timed and compile-only runs
share.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import types
import typing
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

# Run as a script: the repository root holds codi_jax and soft_jax.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
# Only modules that need nothing beyond jax/flax/optax/numpy/absl (no grain, ml_collections,
# tokenizers): the accelerator machine may have just those.
from codi_jax import flops, train_step
from codi_jax.batching import left_pad
from codi_jax.codi.model import Codi, CodiOptions
from codi_jax.decoding import Generator, prefill
from codi_jax.hlo import cost_flops, dot_flops, xla_bytes
from codi_jax.models import memory, transformer
from codi_jax.models.config import AttentionImpl, LoRAConfig, ModelConfig, RopeScaling, tiny
from codi_jax.models.params import split_trainable
from soft_jax.decode import SoftDecoder
from soft_jax.sampling import SamplerParams

FLAGS = flags.FLAGS
MODELS = ("gpt2", "llama")
WORKLOADS = ("train", "greedy", "soft")
IGNORE = -100
SCHEDULE_STEPS = 1000  # optimizer schedule length (irrelevant to timing)
LORA_ALPHA, DROPOUT = 32.0, 0.1
GiB = 1 << 30


def _define_flags():
  flags.DEFINE_bool("smoke", False, "tiny shapes, 1-2 timed repetitions (CPU, seconds)")
  flags.DEFINE_bool("cpu_small", False, "2 layers at the real vocabularies (CPU sanity run)")
  flags.DEFINE_list("models", list(MODELS), f"subset of {','.join(MODELS)}")
  flags.DEFINE_list("workloads", list(WORKLOADS), f"subset of {','.join(WORKLOADS)}")
  flags.DEFINE_bool("flops_only", False, "compile the train steps (no run): XLA FLOPs vs formula")
  flags.DEFINE_bool("full_ft", False, "full fine-tuning (f32 master weights) instead of LoRA r128")
  flags.DEFINE_integer("steps", None, "timed train steps (default: the preset's)")
  flags.DEFINE_integer("warmup", None, "untimed train steps after compiling (default: preset's)")
  flags.DEFINE_integer("runs", None, "timed decode calls per setting (default: the preset's)")
  flags.DEFINE_string("out", "", "also write the table and its inputs as JSON here")
  flags.DEFINE_integer("seed", 0, "weights, batches and prompts")
  flags.DEFINE_enum(
    "attention_impl",
    "xla",
    typing.get_args(AttentionImpl),
    "every model's attention kernel (layers.attention; cudnn: a GPU, the einsum path under "
    "attention dropout)",
  )


# ---------------------------------------------------------------------------------------------
# Shapes


@dataclasses.dataclass(frozen=True)
class TrainShape:
  """One CODI batch: every row full length (no padding)."""

  batch: int
  question: int  # question tokens; the encoder adds <bot>
  cot: int
  answer: int  # answer piece ("The answer is: N" + eos)
  thoughts: int

  def lengths(self) -> dict[str, int]:
    """Padded lengths as `codi_batches.Shapes` names them (Lq, Lt, La, Lw)."""
    q, c, a = self.question, self.cot, self.answer
    return dict(question=q + 1, teacher=q + c + a, decoder=a + 1, teacher_span=c + a)

  def tokens_per_row(self) -> int:
    """Positions run per row: teacher + encoder + thoughts + decoder."""
    n = self.lengths()
    return n["teacher"] + n["question"] + self.thoughts + n["decoder"]

  def describe(self) -> str:
    n = self.lengths()
    return (
      f"q {self.question}(+bot) cot {self.cot} ans {self.answer} | {self.thoughts} thoughts | "
      f"Lt {n['teacher']} Lq {n['question']} La {n['decoder']} Lw {n['teacher_span']}"
    )


@dataclasses.dataclass(frozen=True)
class Preset:
  """Everything a run's size depends on."""

  name: str
  models: dict  # key -> (label, ModelConfig without LoRA, bf16 compute)
  train: dict  # key -> TrainShape
  decode_batches: tuple[int, ...]
  prompt: int
  new_tokens: int
  matmul_n: int
  matmul_iters: int
  copy_mib: int
  copy_iters: int  # back-to-back passes timed together
  probe_reps: int
  warmup: int
  steps: int
  runs: int
  lora_rank: int = 128


GPT2 = ModelConfig(
  arch="gpt2",
  vocab_size=50257 + 3,
  num_layers=12,
  d_model=768,
  num_heads=12,
  num_kv_heads=12,
  head_dim=64,
  d_ff=3072,
  max_positions=1024,
  dtype="bfloat16",
  param_dtype="bfloat16",
)
LLAMA_1B = ModelConfig(
  arch="llama",
  vocab_size=128256 + 3,
  num_layers=16,
  d_model=2048,
  num_heads=32,
  num_kv_heads=8,
  head_dim=64,
  d_ff=8192,
  max_positions=131072,
  rope_theta=500000.0,
  rope_scaling=RopeScaling(),  # llama3: factor 8, low 1, high 4, original 8192
  tie_embeddings=True,
  dtype="bfloat16",
  param_dtype="bfloat16",
)


def _tiny(arch: str, vocab: int, layers: int, d: int, heads: int, kv: int, d_ff: int):
  extra = {} if arch == "gpt2" else dict(rope_theta=500000.0, rope_scaling=RopeScaling())
  return tiny(
    arch,
    vocab_size=vocab,
    num_layers=layers,
    d_model=d,
    num_heads=heads,
    num_kv_heads=kv,
    head_dim=d // heads,
    d_ff=d_ff,
    dtype="bfloat16",
    param_dtype="bfloat16",
    **extra,
  )


def preset(name: str) -> Preset:
  """`full` (the accelerator run), `cpu_small` or `smoke`."""
  if name == "full":
    return Preset(
      name,
      models={"gpt2": ("GPT-2 124M", GPT2), "llama": ("Llama-3.2-1B", LLAMA_1B)},
      # GSM8k-Aug-like: question 64 (+bot), CoT 64, answer 16; the reference's per-device batches.
      train={"gpt2": TrainShape(64, 64, 64, 16, 6), "llama": TrainShape(32, 64, 64, 16, 6)},
      decode_batches=(1, 64),
      prompt=128,
      new_tokens=128,
      matmul_n=8192,
      matmul_iters=8,
      copy_mib=2048,
      copy_iters=16,
      probe_reps=5,
      warmup=2,
      steps=10,
      runs=3,
    )
  if name == "cpu_small":
    return Preset(
      name,
      models={
        "gpt2": ("GPT-2 2L d256", _tiny("gpt2", GPT2.vocab_size, 2, 256, 4, 4, 1024)),
        "llama": ("Llama 2L d256", _tiny("llama", LLAMA_1B.vocab_size, 2, 256, 8, 2, 1024)),
      },
      train={"gpt2": TrainShape(4, 16, 16, 8, 6), "llama": TrainShape(2, 16, 16, 8, 6)},
      decode_batches=(1, 4),
      prompt=32,
      new_tokens=32,
      matmul_n=1024,
      matmul_iters=2,
      copy_mib=256,
      copy_iters=4,
      probe_reps=3,
      warmup=1,
      steps=3,
      runs=2,
    )
  if name == "smoke":
    return Preset(
      name,
      models={
        "gpt2": ("GPT-2 tiny", _tiny("gpt2", 128 + 3, 1, 32, 4, 4, 64)),
        "llama": ("Llama tiny", _tiny("llama", 128 + 3, 1, 32, 4, 2, 64)),
      },
      train={"gpt2": TrainShape(2, 6, 6, 4, 3), "llama": TrainShape(2, 6, 6, 4, 3)},
      decode_batches=(1, 2),
      prompt=8,
      new_tokens=8,
      matmul_n=128,
      matmul_iters=2,
      copy_mib=4,
      copy_iters=2,
      probe_reps=2,
      warmup=1,
      steps=2,
      runs=1,
      lora_rank=8,
    )
  raise ValueError(f"unknown preset {name!r}")


# ---------------------------------------------------------------------------------------------
# Batches (numpy only: the data pipeline imports grain and tokenizers)


def make_examples(shape: TrainShape, base_vocab: int, eos: int, seed: int) -> list[dict]:
  """Random full-length examples in `codi_batches.CodiExamples` item form."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(shape.batch):
    answer = np.append(rng.integers(0, base_vocab, shape.answer - 1), eos).astype(np.int32)
    out.append(
      dict(
        question=rng.integers(0, base_vocab, shape.question).astype(np.int32),
        cot=rng.integers(0, base_vocab, shape.cot).astype(np.int32),
        answer=answer,
        distill=shape.answer - 3,  # the prompt's ":", before the value token and eos
        index=i,
      )
    )
  return out


def collate_full(examples: list[dict], pad: int, bot: int, eot: int) -> dict[str, np.ndarray]:
  """`codi_batches.collate` for full-length rows (no padding), with the teacher's label window."""
  q = np.stack([e["question"] for e in examples])
  c = np.stack([e["cot"] for e in examples])
  a = np.stack([e["answer"] for e in examples])
  B, nq, nc, na = q.shape[0], q.shape[1], c.shape[1], a.shape[1]
  distill = np.asarray([e["distill"] for e in examples], np.int32)
  teacher = np.concatenate([q, c, a], 1)
  teacher_labels = teacher.copy()
  teacher_labels[:, :nq] = IGNORE
  del pad  # full-length rows: no padding
  return dict(
    encoder_ids=np.concatenate([q, np.full((B, 1), bot, np.int32)], 1),
    encoder_mask=np.ones((B, nq + 1), bool),
    teacher_ids=teacher,
    teacher_labels=teacher_labels,
    teacher_mask=np.ones(teacher.shape, bool),
    teacher_distill_index=(nq + nc + distill).astype(np.int32),
    teacher_label_pos=np.broadcast_to(
      (max(nq, 1) - 1 + np.arange(nc + na)).astype(np.int32), (B, nc + na)
    ).copy(),
    decoder_ids=np.concatenate([np.full((B, 1), eot, np.int32), a], 1),
    decoder_labels=np.concatenate([np.full((B, 1), IGNORE, np.int32), a], 1),
    decoder_mask=np.ones((B, na + 1), bool),
    decoder_distill_index=(1 + distill).astype(np.int32),
  )


def special_ids(cfg: ModelConfig) -> tuple[int, int, int, int]:
  """(pad, bot, eot, eos): the 3 added rows and an eos inside the base vocabulary."""
  V = cfg.vocab_size
  return V - 3, V - 2, V - 1, V - 4


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes


def train_flops(cfg: ModelConfig, shape: TrainShape, lora_rank: int, full_ft: bool) -> dict:
  """Model FLOPs of one CODI train step by the module docstring's formula (`codi_jax.flops`)."""
  return flops.train_flops(
    cfg,
    shape.lengths(),
    batch=shape.batch,
    thoughts=shape.thoughts,
    lora_rank=lora_rank,
    full_ft=full_ft,
  )


def weight_bytes(model: transformer.Transformer) -> int:
  """Bytes a decode step streams from the weights: every parameter but GPT-2's position table."""
  state = nnx.state(model, nnx.Param)
  total = memory.param_bytes(state)
  if model.pos_embed is not None:
    total -= memory.param_bytes(nnx.state(model.pos_embed, nnx.Param))
  return total


def kv_bytes(cfg: ModelConfig, batch: int, filled: float) -> float:
  """K and V bytes of every layer at `filled` slots per row (read once per decode step)."""
  item = np.dtype(cfg.dtype).itemsize
  return 2 * cfg.num_layers * batch * filled * cfg.num_kv_heads * cfg.head_dim * item


# ---------------------------------------------------------------------------------------------
# Measurement helpers


class Memory:
  """Peak device memory per row: the allocator's running peak where the backend reports it."""

  def __init__(self, device):
    self.device = device
    self.last_peak = self._peak()

  def _peak(self):
    try:
      stats = self.device.memory_stats()
    except Exception:  # pylint: disable=broad-except  (unimplemented on some backends)
      stats = None
    return (
      None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])
    )

  def reading(self, fallback_bytes: float, fallback_source: str) -> tuple[float, str]:
    """(bytes, source). "device": the peak rose during the row, so it is this row's;
    "device<=": it did not, so the row's peak is at most this; else the fallback (an XLA or
    formula estimate)."""
    peak = self._peak()
    if peak is None:
      return float(fallback_bytes), fallback_source
    rose, self.last_peak = peak > (self.last_peak or 0), peak
    return float(peak), "device" if rose else "device<="


def free():
  """Drops the last section's arrays before the next one allocates."""
  gc.collect()


def median_time(fn, n: int) -> tuple[float, list[float]]:
  """(median seconds, every time) of n calls; nan for n = 0."""
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return (statistics.median(times) if times else float("nan")), times


# ---------------------------------------------------------------------------------------------
# Probes


def matmul_probe(n: int, iters: int, reps: int) -> float:
  """Best bf16 FLOP/s of `iters` chained [n, n] x [n, n] matmuls in one program."""
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (n, n), jnp.bfloat16)
  w = (jax.random.normal(kw, (n, n), jnp.float32) / math.sqrt(n)).astype(jnp.bfloat16)
  f = jax.jit(lambda x, w: jax.lax.fori_loop(0, iters, lambda i, x: x @ w, x))
  f(x, w).block_until_ready()
  best = min(median_time(lambda: f(x, w).block_until_ready(), 1)[0] for _ in range(reps))
  return 2 * n**3 * iters / best


def copy_probe(mib: int, calls: int, reps: int) -> float:
  """Best bytes/s (read + write) of `calls` back-to-back elementwise passes over an f32 array of
  `mib` MiB (`x * c`, c a runtime scalar, the input donated: a copy in place). One pass per
  program, so no compiler can fuse passes."""
  x = jax.random.uniform(jax.random.key(2), (mib * 2**20 // 4,), jnp.float32)
  nbytes = x.nbytes
  c = jnp.float32(1.0)  # an argument, so the multiply is not simplified away
  f = jax.jit(lambda x, c: x * c, donate_argnums=0)
  x = f(x, c).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(calls):
      x = f(x, c)
    x.block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * nbytes * calls / best


# ---------------------------------------------------------------------------------------------
# Sections


def _optim_config():
  """What `train_step.make_optimizer` reads (configs/base.py values), without ml_collections."""
  return types.SimpleNamespace(
    lr=3e-3, warmup_ratio=0.03, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8, clip=2.0, grad_accum=1
  )


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """One model's jitted CODI train step and its arguments (arrays, or shapes when abstract)."""

  label: str
  cfg: ModelConfig
  shape: TrainShape
  step_fn: object  # jax.jit(train_step), not yet lowered
  args: tuple  # (train state, opt state, frozen, batch, step)
  params: int
  trainable: int


def train_setup(
  key: str, p: Preset, full_ft: bool, seed: int, *, abstract: bool = False, thoughts=None
) -> TrainSetup:
  """The CODI model at this preset's shape, its trainable/frozen split, AdamW state, a full-length
  batch and `train_step.make_train_step`; abstract=True: weights and optimizer state are shapes
  (`nnx.eval_shape`), so a compile-only run allocates no weights. thoughts: override N."""
  label, base = p.models[key]
  shape = p.train[key]
  if thoughts is not None:
    shape = dataclasses.replace(shape, thoughts=thoughts)
  lora = None if full_ft else LoRAConfig(rank=p.lora_rank, alpha=LORA_ALPHA, dropout=DROPOUT)
  drop = DROPOUT if base.arch == "gpt2" else 0.0  # Llama has no attention/residual dropout
  cfg = base.replace(
    lora=lora,
    embed_dropout=drop,
    attn_dropout=drop,
    resid_dropout=drop,
    param_dtype="float32" if full_ft else base.param_dtype,
  )

  def build():
    return Codi(transformer.build(cfg, seed), rngs=nnx.Rngs(params=seed + 2))

  codi = nnx.eval_shape(build) if abstract else build()
  if full_ft:
    graphdef, state, frozen = nnx.split(codi, nnx.Param, ...)
  else:
    graphdef, state, frozen = split_trainable(codi, extra=("prj",))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(codi, nnx.Param)))
  n_train = sum(x.size for x in jax.tree.leaves(state))
  del codi
  pad, bot, eot, eos = special_ids(cfg)
  examples = make_examples(shape, cfg.vocab_size - 3, eos, seed)
  batch = {k: jnp.asarray(v) for k, v in collate_full(examples, pad, bot, eot).items()}
  tx, _ = train_step.make_optimizer(_optim_config(), SCHEDULE_STEPS)
  opt = jax.eval_shape(tx.init, state) if abstract else tx.init(state)
  opts = CodiOptions(num_latent=shape.thoughts)
  step_fn = train_step.make_train_step(graphdef, tx, jax.random.key(seed), opts, True)
  args = (state, opt, frozen, batch, jnp.int32(0))
  return TrainSetup(label, cfg, shape, step_fn, args, n_params, n_train)


def train_row(key: str, p: Preset, mem: Memory, full_ft: bool, seed: int) -> dict:
  """Builds the CODI model at this shape, compiles its train step and times it."""
  s = train_setup(key, p, full_ft, seed)
  label, cfg, shape = s.label, s.cfg, s.shape
  state, opt, frozen, batch, _ = s.args
  t0 = time.perf_counter()
  compiled = s.step_fn.lower(*s.args).compile()
  compile_s = time.perf_counter() - t0
  i = 0
  losses = []

  def one():
    nonlocal state, opt, i
    state, opt, m = compiled(state, opt, frozen, batch, jnp.int32(i))
    jax.block_until_ready((state, m))
    losses.append(float(m["loss"]))
    i += 1

  median_time(one, p.warmup)
  step_s, times = median_time(one, p.steps)
  if not all(math.isfinite(x) for x in losses):
    raise FloatingPointError(f"{label}: non-finite training loss {losses}")
  flops = train_flops(cfg, shape, p.lora_rank, full_ft)
  xla_flops = cost_flops(compiled)
  xla_mem = xla_bytes(compiled)
  peak, source = mem.reading(xla_mem, "xla")
  tokens = shape.batch * shape.tokens_per_row()
  return dict(
    model=label,
    workload="train full" if full_ft else f"train LoRA r{p.lora_rank}",
    batch=shape.batch,
    tokens=tokens,
    shape=shape.describe(),
    ms=1e3 * step_s,
    times_ms=[1e3 * t for t in times],
    tok_s=tokens / step_s,
    flops_formula=flops["total"],
    flops_terms=flops,
    flops_xla=xla_flops,
    tflops_formula=flops["total"] / step_s / 1e12,
    decode_tok_s=None,
    bytes_per_step=None,
    peak_bytes=peak,
    peak_source=source,
    xla_bytes=xla_mem,
    compile_s=compile_s,
    params=s.params,
    trainable=s.trainable,
    losses=losses,
    step_s=step_s,
  )


def flops_row(key: str, p: Preset, full_ft: bool, seed: int) -> dict:
  """Compiles (never runs) the train step on abstract weights; XLA's FLOPs against the formula.

  XLA counts a while body once and the thought scan (forward and its backward) runs N - 1 times,
  so for N >= 3 the step is also compiled at N = 1 (no scan) and N = 2 (one iteration): per
  thought = XLA(2) - XLA(1), corrected = XLA(N) + (N - 2) x per thought. `dot_flops` splits the
  dots by term with the loops' trip counts; non-dot = corrected - all dots."""
  N = p.train[key].thoughts
  counts, compile_s = {}, 0.0
  for n in (N, 1, 2) if N >= 3 else (N,):
    s = train_setup(key, p, full_ft, seed, abstract=True, thoughts=n)
    t0 = time.perf_counter()
    # Nothing runs: LLVM's optimisation would only cost time (XLA's HLO and its counts are the same).
    compiled = s.step_fn.lower(*s.args).compile({"xla_backend_optimization_level": 0})
    compile_s += time.perf_counter() - t0
    counts[n] = cost_flops(compiled)
    if n == N:
      setup, dots = s, dot_flops(compiled.as_text())
    del compiled
  per_thought = counts[2] - counts[1] if N >= 3 else float("nan")
  corrected = counts[N] + (N - 2) * per_thought if N >= 3 else counts[N]
  return dict(
    model=setup.label,
    shape=setup.shape.describe(),
    batch=setup.shape.batch,
    thoughts=N,
    flops_terms=train_flops(setup.cfg, setup.shape, p.lora_rank, full_ft),
    flops_xla_raw=counts[N],
    flops_xla_per_thought=per_thought,
    flops_xla=corrected,
    flops_dots=dots,
    compile_s=compile_s,
    params=setup.params,
    trainable=setup.trainable,
  )


def flops_table(rows: list[dict]) -> str:
  """One line per model and term: formula vs XLA GFLOP (dots by term, then totals)."""
  lines = []
  for r in rows:
    t, d = r["flops_terms"], r["flops_dots"]
    dots = sum(d.values())
    terms = [(k, t[k], d.get(k, 0.0)) for k in ("dense", "head", "attention", "prj")]
    terms += [
      ("other dots", None, d.get("other", 0.0)),
      ("non-dot", None, r["flops_xla"] - dots),
      ("total", t["total"], r["flops_xla"]),
      ("total, loops once", t["total"], r["flops_xla_raw"]),
    ]
    for term, f, x in terms:
      formula, ratio = (None, None) if not f else (f / 1e9, x / f)
      lines.append(dict(model=r["model"], term=term, formula=formula, xla=x / 1e9, ratio=ratio))
  cols = (
    ("model", "model"),
    ("term", "term"),
    ("formula", "formula GFLOP"),
    ("xla", "XLA GFLOP"),
    ("ratio", "XLA / formula"),
  )
  return table(lines, cols, {"formula": ",.5g", "xla": ",.5g", "ratio": ".3f"})


def _prefill_only(model, ids, mask, *, capacity):
  logits, cache, pos = prefill(model, ids, mask, capacity)
  return logits, cache, pos


def decode_rows(key: str, p: Preset, mem: Memory, workloads, seed: int) -> list[dict]:
  """Greedy and soft decoding of random prompts at every batch of the preset."""
  label, cfg = p.models[key]
  model = transformer.build(cfg, seed)
  w_bytes = weight_bytes(model)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  V, P, N = cfg.vocab_size, p.prompt, p.new_tokens
  pad = V - 3
  never = [V]  # outside the vocabulary: no row stops early
  decoders = {}
  if "greedy" in workloads:
    gen = Generator(model, pad_id=pad, eos_ids=never)
    decoders["greedy"] = lambda prompts: [len(t) for t in gen(prompts, N, length_bucket=P)]
    jm = gen.model
  if "soft" in workloads:
    soft = SoftDecoder(model, SamplerParams(), pad_id=pad, eos_ids=never)
    decoders["soft"] = lambda prompts: [
      len(r.tokens) for r in soft(prompts, max_new_tokens=N, length_bucket=P)
    ]
    jm = soft.model
  del model
  prefill_fn = jm.jit(_prefill_only, static_argnames=("capacity",), name="prefill_only")
  rng = np.random.default_rng(seed + 7)
  rows = []
  for B in p.decode_batches:
    prompts = rng.integers(0, V - 3, (B, P)).tolist()
    ids, mask = (jm.put_batch(x) for x in left_pad(prompts, pad, P))

    def run_prefill(ids=ids, mask=mask):
      jax.block_until_ready(prefill_fn(ids, mask, capacity=P + N))

    run_prefill()
    prefill_s, _ = median_time(run_prefill, max(p.runs, 2))
    filled = P + N / 2  # mean slots a decode step reads
    step_bytes = w_bytes + kv_bytes(cfg, B, filled)
    capacity = P + N
    est = memory.decode_bytes(cfg, B, capacity, prompt_len=P) + w_bytes
    for mode, fn in decoders.items():
      t0 = time.perf_counter()
      lengths = fn(prompts)  # compiles
      first_s = time.perf_counter() - t0
      if lengths != [N] * B:
        raise RuntimeError(f"{label} {mode} batch {B}: rows stopped early: {lengths}")
      call_s, times = median_time(lambda fn=fn, prompts=prompts: fn(prompts), p.runs)
      decode_s = call_s - prefill_s
      if decode_s <= 0:  # timing noise on tiny shapes: fall back to the whole call
        decode_s = call_s
      peak, source = mem.reading(est, "est")
      rows.append(
        dict(
          model=label,
          workload=mode,
          batch=B,
          tokens=B * N,
          shape=f"prompt {P} + {N} new, cache {capacity}",
          ms=1e3 * call_s,
          times_ms=[1e3 * t for t in times],
          tok_s=B * N / call_s,
          flops_formula=None,
          flops_xla=None,
          tflops_formula=None,
          decode_tok_s=B * (N - 1) / decode_s,
          prefill_ms=1e3 * prefill_s,
          decode_s=decode_s,
          bytes_per_step=step_bytes,
          weight_bytes=w_bytes,
          peak_bytes=peak,
          peak_source=source,
          compile_s=max(first_s - call_s, 0.0),
          params=n_params,
        )
      )
  return rows


# ---------------------------------------------------------------------------------------------
# Report


def _fmt(x, spec: str) -> str:
  """`spec`, or "-" for no value; "%" is 3 significant digits of a percentage."""
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "-"
  return f"{100 * x:.3g}%" if spec == "%" else format(x, spec)


COLUMNS = (
  ("model", "model"),
  ("workload", "workload"),
  ("batch", "batch"),
  ("tokens", "tokens/call"),
  ("ms", "ms (median)"),
  ("tok_s", "tok/s"),
  ("tflops_formula", "TFLOP/s"),
  ("mfu_formula", "MFU formula"),
  ("mfu_xla", "MFU XLA"),
  ("decode_tok_s", "decode tok/s"),
  ("bw_frac", "BW used"),
  ("peak_gib", "peak GiB"),
  ("peak_source", "mem src"),
  ("compile_s", "compile s"),
)
FORMATS = {
  "batch": "d",
  "tokens": ",d",
  "ms": ",.1f",
  "tok_s": ",.0f",
  "tflops_formula": ".3g",
  "mfu_formula": "%",
  "mfu_xla": "%",
  "decode_tok_s": ",.0f",
  "bw_frac": "%",
  "peak_gib": ".3g",
  "compile_s": ".1f",
}


def finish_rows(rows: list[dict], matmul_flops: float, copy_bw: float) -> None:
  """Adds the probe-relative columns."""
  for r in rows:
    r["peak_gib"] = r["peak_bytes"] / GiB
    r["mfu_formula"] = r["mfu_xla"] = r["bw_frac"] = None
    if r["flops_formula"] is not None:
      r["mfu_formula"] = r["flops_formula"] / r["step_s"] / matmul_flops
      if math.isfinite(r["flops_xla"]):
        r["mfu_xla"] = r["flops_xla"] / r["step_s"] / matmul_flops
    if r["bytes_per_step"] is not None:
      steps = r["tokens"] // r["batch"] - 1
      r["bw_frac"] = r["bytes_per_step"] * steps / r["decode_s"] / copy_bw


def table(rows: list[dict], columns=COLUMNS, formats=None) -> str:
  """A markdown table of `columns` ((key, header) pairs), cells formatted by `formats` (`_fmt`)."""
  formats = FORMATS if formats is None else formats
  cells = [[h for _, h in columns]]
  for r in rows:
    cells.append([_fmt(r.get(k), formats[k]) if k in formats else str(r[k]) for k, _ in columns])
  widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def _version(pkg: str) -> str:
  try:
    return importlib.metadata.version(pkg)
  except importlib.metadata.PackageNotFoundError:
    return "?"


def flops_report(p: Preset, models, header: dict, t_start: float) -> None:
  """--flops_only: `flops_row` per model, the per-term table, and --out."""
  rows = []
  for key in models:
    r = flops_row(key, p, FLAGS.full_ft, FLAGS.seed)
    rows.append(r)
    free()
    print(
      f"[{time.perf_counter() - t_start:6.1f} s] {r['model']}: {r['shape']}, batch {r['batch']}; "
      f"{r['params']:,} params, {r['trainable']:,} trainable; XLA per thought "
      f"{r['flops_xla_per_thought'] / 1e9:,.4g} GFLOP; compiles {r['compile_s']:.0f} s",
      flush=True,
    )
  load1 = os.getloadavg()
  header.update(load_avg_end=load1)
  print(
    f"\ncompile only ({header['mode']}): formula = the module docstring's model FLOPs; XLA = "
    "`cost_analysis()` of the compiled step, its thought scan corrected to N iterations "
    "(`flops_row`); per term: XLA's dots with loop trip counts (`dot_flops`)\n"
  )
  print(flops_table(rows))
  print(f"\nload average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"header": header, "rows": rows}, f, indent=1, default=float)
    print(f"wrote {FLAGS.out}")


def main(argv):
  del argv
  t_start = time.perf_counter()
  warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
  if FLAGS.smoke and FLAGS.cpu_small:
    raise app.UsageError("--smoke and --cpu_small are exclusive")
  name = "smoke" if FLAGS.smoke else "cpu_small" if FLAGS.cpu_small else "full"
  p = preset(name)
  p = dataclasses.replace(
    p,
    warmup=p.warmup if FLAGS.warmup is None else FLAGS.warmup,
    steps=p.steps if FLAGS.steps is None else FLAGS.steps,
    runs=p.runs if FLAGS.runs is None else FLAGS.runs,
  )
  models = [m for m in FLAGS.models if m]
  workloads = [w for w in FLAGS.workloads if w]
  for bad in set(models) - set(MODELS):
    raise app.UsageError(f"--models: unknown {bad!r}; choose from {','.join(MODELS)}")
  for bad in set(workloads) - set(WORKLOADS):
    raise app.UsageError(f"--workloads: unknown {bad!r}; choose from {','.join(WORKLOADS)}")
  impl = FLAGS.attention_impl
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise app.UsageError(
      f"--attention_impl=cudnn needs a GPU; jax's backend is {jax.default_backend()}"
    )
  models_cfg = {
    k: (label, cfg.replace(attention_impl=impl)) for k, (label, cfg) in p.models.items()
  }
  p = dataclasses.replace(p, models=models_cfg)

  dev = jax.devices()[0]
  load0 = os.getloadavg()
  header = dict(
    preset=name,
    date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    host=platform.node(),
    device=f"{dev.platform} {dev.device_kind}",
    device_count=jax.device_count(),
    jax=jax.__version__,
    jaxlib=_version("jaxlib"),
    flax=_version("flax"),
    optax=_version("optax"),
    python=platform.python_version(),
    load_avg_start=load0,
    mode="full fine-tuning (f32 master weights)" if FLAGS.full_ft else f"LoRA r{p.lora_rank}",
    attention_impl=impl,
  )
  print(
    f"accelerator benchmark ({name}) | {header['date']} | device {header['device']} "
    f"(x{header['device_count']}, first used) | jax {header['jax']} jaxlib {header['jaxlib']} "
    f"flax {header['flax']} optax {header['optax']} | python {header['python']} | attention "
    f"{impl} | load average "
    f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}",
    flush=True,
  )

  def elapsed():
    return f"[{time.perf_counter() - t_start:6.1f} s]"

  if FLAGS.flops_only:
    flops_report(p, models, header, t_start)
    return
  mem = Memory(dev)
  rows = []
  decode_wl = [w for w in workloads if w != "train"]
  # Decoding first, then training, then the probes: the allocator's running peak then rises with
  # each row (smaller programs first), so most rows read their own peak (docstring of Memory).
  if decode_wl:
    for key in models:
      t0 = time.perf_counter()
      rows += decode_rows(key, p, mem, decode_wl, FLAGS.seed)
      free()
      print(f"{elapsed()} decode {p.models[key][0]}: {time.perf_counter() - t0:.1f} s", flush=True)
  if "train" in workloads:
    for key in models:
      t0 = time.perf_counter()
      rows.append(train_row(key, p, mem, FLAGS.full_ft, FLAGS.seed))
      free()
      print(f"{elapsed()} train {p.models[key][0]}: {time.perf_counter() - t0:.1f} s", flush=True)
  t0 = time.perf_counter()
  matmul_flops = matmul_probe(p.matmul_n, p.matmul_iters, p.probe_reps)
  copy_bw = copy_probe(p.copy_mib, p.copy_iters, p.probe_reps)
  print(f"{elapsed()} probes: {time.perf_counter() - t0:.1f} s", flush=True)
  finish_rows(rows, matmul_flops, copy_bw)

  load1 = os.getloadavg()
  header.update(load_avg_end=load1, matmul_flops=matmul_flops, copy_bytes_s=copy_bw)
  print(
    f"\nprobes (same run): bf16 matmul {p.matmul_n}^2 x{p.matmul_iters} chained, best of "
    f"{p.probe_reps}: {matmul_flops / 1e12:.2f} TFLOP/s | copy of {p.copy_mib} MiB f32 "
    f"x{p.copy_iters} passes, read + write, best of {p.probe_reps}: {copy_bw / 1e9:.1f} GB/s"
  )
  for key in models:
    label, cfg = p.models[key]
    print(
      f"{label}: {cfg.arch}, {cfg.num_layers} layers, d={cfg.d_model}, {cfg.num_heads} heads "
      f"({cfg.num_kv_heads} kv, head dim {cfg.head_dim}), d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, "
      f"{cfg.dtype} compute; train batch {p.train[key].describe()}"
    )
  train_rows = [r for r in rows if r["flops_formula"] is not None]
  for r in train_rows:
    t = r["flops_terms"]
    print(
      f"  {r['model']} train: {r['params']:,} params, {r['trainable']:,} trainable; GFLOP/step "
      f"formula {t['total'] / 1e9:,.4g} (dense {t['dense'] / 1e9:,.4g}, head "
      f"{t['head'] / 1e9:,.4g}, attention {t['attention'] / 1e9:,.4g}, prj {t['prj'] / 1e9:,.4g}), "
      f"XLA {r['flops_xla'] / 1e9:,.4g}; XLA memory estimate "
      f"{r['xla_bytes'] / GiB:.3g} GiB; losses {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
    )
  if decode_wl:
    print(
      f"decode: prompt {p.prompt} random tokens, {p.new_tokens} new (eos outside the vocabulary: "
      f"every row generates all), bf16 weights and KV cache; greedy = Generator, soft = "
      f"SoftDecoder(SamplerParams()) soft mode T 0.6 top-k 30 top-p 0.95 K 10; median of {p.runs} "
      f"calls after a compiling one; bytes/step = weights + KV at {p.prompt} + {p.new_tokens}/2 "
      "slots"
    )
  print(
    f"protocol: train = median of {p.steps} steps after {p.warmup} warm-up (AOT-compiled), "
    f"{header['mode']} + projection, LoRA dropout {DROPOUT} (GPT-2: all dropout), one teacher "
    "pass; MFU = model FLOPs / step time / measured matmul rate; mem src: device = allocator "
    "peak during the row, device<= = peak not raised by the row (an upper bound), xla = "
    "compiled memory_analysis, est = memory.decode_bytes + weights\n"
  )
  print(table(rows))
  print(
    f"\nload average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; total "
    f"{time.perf_counter() - t_start:.0f} s"
  )
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"header": header, "rows": rows}, f, indent=1, default=float)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
