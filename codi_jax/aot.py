"""The programs of a run, built on abstract weights for ahead-of-time compilation (`codi_jax.compile`).

Everything is built as `codi_jax.train` builds it (the config's model, mesh, logical-axis rules,
trainable split, optimizer and shardings: `build.abstract_model`, `train_state`) with shapes in
place of weights, data and checkpoints. Batches come from one synthetic example of the given
lengths, padded and rewritten by the training pipeline's own functions (`example_batch`), so the
step sees the keys, dtypes and shapes a real batch of those lengths has. Decoding programs are the
decoders' own, lowered for their last cache bucket (`CodiDecoder.lower`, `SoftDecoder.lower`).
"""
# pylint: disable=invalid-name

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx

from codi_jax import flops, sharding, train_state, train_step
from codi_jax.batching import bucket_size
from codi_jax.codi import build
from codi_jax.codi.decoder import CodiDecoder
from codi_jax.codi.model import CodiOptions
from codi_jax.data import codi_batches, curriculum
from codi_jax.data.codi_batches import CodiExamples, SpecialIds
from codi_jax.errors import InputError
from codi_jax.models import loader, memory, transformer

# Example lengths in tokens when --lengths gives none: the longest GSM8k-Aug validation/test example
# under GPT-2's tokenizer (question 182, CoT 81, answer piece 10, 8 calculator steps), rounded up;
# prompt: a soft-thinking problem's chat prompt (MATH500-sized).
DEFAULT_LENGTHS = {"question": 192, "cot": 96, "answer": 16, "steps": 8, "prompt": 256}
SCHEDULE_STEPS = 1000  # optimizer schedule length when the config gives none (shapes only)
MODES = {  # decoding modes of each method's validation (train_lib._MODES)
  "codi": ("student", "teacher"),
  "cot_sft": ("teacher",),
  "no_cot_sft": ("student",),
  "coconut": ("student",),
  "icot_si": ("teacher",),
}


@dataclasses.dataclass
class Program:
  """One program of a run, ready to lower."""

  name: str  # e.g. "train codi", "decode student", "soft decode"
  kind: str  # train | decode
  lower: Callable[[], jax.stages.Lowered]
  batch: int  # global rows per call
  tokens: int  # positions per call: trained positions (train), new tokens at most (decode)
  model_flops: float | None = None  # per call, by formula (`codi_jax.flops`); train only
  extra_bytes: int = 0  # per chip beyond XLA's analysis: the cache growth copy (decode)
  open_trips: int | None = None  # trips of a loop whose HLO states none: a decode at its budget
  arg_bytes: int = 0  # per chip: the arguments' shards (when XLA refuses to compile: the lever)
  detail: str = ""  # shapes, for the table's notes
  params: dict = dataclasses.field(default_factory=dict)  # what picks the lever if it does not fit


@contextlib.contextmanager
def on_host():
  """Eager work (a PRNG key) on this host's CPU while the active mesh is a topology's devices,
  which run nothing here; the mesh context is unchanged for what traces inside."""
  cpu = jax.local_devices(backend="cpu")[:1]
  with jax.set_mesh(jax.sharding.Mesh(np.array(cpu), ("host",))):
    yield


def parse_lengths(text: str) -> dict[str, int]:
  """--lengths "question:Q,cot:C,answer:A,steps:S,prompt:P" (any subset) over DEFAULT_LENGTHS."""
  out = dict(DEFAULT_LENGTHS)
  for item in filter(None, (t.strip() for t in (text or "").split(","))):
    key, _, value = item.partition(":")
    if key not in DEFAULT_LENGTHS or not value.isdigit() or int(value) < 1:
      raise InputError(
        f"--lengths: {item!r}; expected name:tokens (>= 1) with names {', '.join(DEFAULT_LENGTHS)}"
      )
    out[key] = int(value)
  if out["answer"] < 2:
    raise InputError("--lengths: answer needs >= 2 tokens (the distilled token and eos)")
  return out


# ---------------------------------------------------------------------------------------------
# Training


def example_batch(config, method: str, lengths: Mapping[str, int], ids: SpecialIds):
  """(one row of the batch `method` trains on at its last curriculum stage, the padded lengths):
  a synthetic example of `lengths` through the pipeline's padding and `Curriculum.batch`."""
  q, c, a = lengths["question"], lengths["cot"], lengths["answer"]
  one = CodiExamples(
    [np.ones(q, np.int32)],
    [np.ones(c, np.int32)],
    [np.append(np.ones(a - 1, np.int32), ids.eos).astype(np.int32)],
    [a - 2],  # the value token before eos is distilled
    [0],
    ids,
  )
  buckets, max_padding = config.data.buckets, config.data.get("max_padding", 0.0)
  if method == "coconut":
    n = max(1, min(lengths["steps"], c))
    steps = np.full(n, c // n, np.int32)
    steps[: c % n] += 1
    examples = curriculum.StepExamples(one, [steps])
    shapes = curriculum.fit_coconut_shapes(examples, buckets, max_padding)
    row = curriculum.coconut_example(examples[0], shapes, ids)
  else:
    shapes = codi_batches.fit_shapes(one, buckets, max_padding)
    pad = curriculum.icot_example if method == "icot_si" else codi_batches.pad_example
    row = pad(one[0], shapes, ids)
  cur = curriculum.Curriculum(
    method, config.codi, longest_cot=c, seed=config.seed, pad_id=ids.pad, global_rows=1
  )
  step = _last_stage_step(cur)
  local = cur.batch({k: np.asarray(v)[None] for k, v in row.items()}, step)
  return local, dataclasses.asdict(shapes), cur.num_latent(step)


def _last_stage_step(cur: curriculum.Curriculum) -> int:
  """A step in the curriculum's last stage (Coconut: the most thoughts; iCoT-SI: all removed)."""
  if cur.coconut:
    return cur.coconut.first_step(cur.coconut.max_latent_stage + 1)
  return 10**6


def method_config(config, method: str):
  """A copy of the training config that trains `method`."""
  c = config.copy_and_resolve_references()
  c.codi.method = method
  return c


def train_program(config, method: str, lengths: Mapping[str, int], model_json: str = ""):
  """The CODI train step of `method` as `Trainer._step_fn` compiles it (on the active mesh)."""
  c = method_config(config, method)
  cfg, ids = build.model_config(c, model_json)
  codi = build.abstract_model(c, cfg)
  s = train_state.split(codi, c, c.optim.num_steps or SCHEDULE_STEPS)
  local, shapes, n = example_batch(c, method, lengths, ids)
  B = c.data.batch_size
  split = sharding.batch_axes_size()
  if B % split:
    raise InputError(
      f"--config.data.batch_size: {B} is not a multiple of the batch mesh axes ({split} devices)"
    )
  batch = {k: jax.ShapeDtypeStruct((B,) + v.shape[1:], v.dtype) for k, v in local.items()}
  shardings, args = train_state.step_args(s, train_state.abstract_opt_state(s), batch)
  opts = CodiOptions.from_config(c.codi)
  if n is not None:
    opts = dataclasses.replace(opts, num_latent=n)
  with on_host():  # the key's bits, made here; wrapping them runs nothing on the mesh
    key_data = np.asarray(jax.random.key_data(jax.random.key(c.seed)))
  key = jax.random.wrap_key_data(key_data)
  fn = train_step.make_train_step(
    s.graphdef,
    s.tx,
    key,
    opts,
    train_step.dropout_on(codi, c),
    shardings=shardings,
  )
  m = c.model
  full_ft = m.lora_rank == 0 or not m.spec
  model_flops = flops.train_flops(
    cfg.replace(vocab_size=cfg.vocab_size + 3),
    shapes,
    batch=B,
    thoughts=opts.num_latent,
    lora_rank=m.lora_rank,
    full_ft=full_ft,
    method=method,
    separate_teacher_pass=opts.separate_teacher_target_pass,
    projection=opts.use_prj,
  )["total"]
  short = {"question": "Lq", "teacher": "Lt", "decoder": "La", "teacher_span": "Lw", "steps": "S"}
  lens = " ".join(f"{short[k]} {v}" for k, v in shapes.items() if v)
  return Program(
    f"train {method}",
    "train",
    lambda: fn.lower(*args),
    B,
    B * flops.positions(shapes, opts.num_latent, method),
    model_flops,
    arg_bytes=memory.param_bytes(args, per_device=True),
    detail=f"{lens} N {opts.num_latent}",
    params=dict(
      remat=bool(c.codi.remat_teacher and c.codi.remat_thoughts),
      f32_weights=m.param_dtype == "float32" or m.dtype == "float32",
      full_ft=full_ft,
    ),
  )


# ---------------------------------------------------------------------------------------------
# Decoding


def _growth_bytes(cfg, batch: int, caps) -> int:
  """Per-chip bytes of the previous bucket's cache, alive while it grows into the last one."""
  if len(caps) < 2:
    return 0
  mesh, rules = sharding.current()
  dev_cfg, dev_batch = memory.per_device(cfg, batch, mesh, rules)
  return memory.kv_cache_bytes(dev_cfg, dev_batch, caps[-2])


def codi_decode_programs(config, lengths: Mapping[str, int], model_json: str = "") -> list[Program]:
  """Validation decoding of the config's method (`train_lib.Validator`): each mode at
  config.eval.batch_size questions padded to the question's bucket, config.eval.max_new_tokens."""
  cfg, ids = build.model_config(config, model_json)
  codi = build.abstract_model(config, cfg)
  opts = CodiOptions.from_config(config.codi, inference=True)
  width = bucket_size(lengths["question"] + 1, config.data.buckets)
  B, new = config.eval.batch_size, config.eval.max_new_tokens
  decoder = CodiDecoder(codi, ids, [ids.eos], opts=opts, max_new_tokens=new, buckets=[width])
  out = []
  for mode in MODES[opts.method]:
    n = opts.num_latent if mode == "student" else None
    lowered, caps = decoder.lower(mode, B, width, n)
    out.append(
      Program(
        f"decode {mode}",
        "decode",
        lambda lowered=lowered: lowered,
        B,
        B * new,
        extra_bytes=_growth_bytes(decoder.model.config, B, caps),
        arg_bytes=memory.param_bytes(decoder.model.state, per_device=True),
        detail=f"Lq {width}" + (f" N {n}" if n is not None else "") + f" +{new}, cache {caps[-1]}",
        params=dict(f32_weights=cfg.param_dtype == "float32"),
      )
    )
  return out


def soft_decode_program(config, batch: int, lengths: Mapping[str, int], model_json: str = ""):
  """Soft Thinking decoding of a soft preset (`SoftDecoder`) at `batch` rows, a prompt of
  lengths["prompt"] tokens (its length bucket) and the preset's budget (max_new_tokens)."""
  from soft_jax.cli_common import sampler_params  # pylint: disable=import-outside-toplevel
  from soft_jax.decode import SoftDecoder  # pylint: disable=import-outside-toplevel

  cfg, eos = loader.load_config(
    config.model, dtype=config.dtype, param_dtype=config.dtype, config_json=model_json
  )
  model = nnx.eval_shape(lambda: transformer.build(cfg))
  params = sampler_params(config.mode, config, {})
  width = bucket_size(lengths["prompt"], config.length_bucket)
  new = config.max_new_tokens
  dec = SoftDecoder(
    model, params, pad_id=0, eos_ids=[cfg.vocab_size - 1 if eos is None else eos], think_end_id=0
  )
  lowered, caps = dec.lower(batch, width, max_new_tokens=new)
  return Program(
    f"soft decode ({config.mode})",
    "decode",
    lambda: lowered,
    batch,
    batch * new,
    extra_bytes=_growth_bytes(cfg, batch, caps),
    open_trips=-(-(new - 1) // dec.chunk),  # chunks of steps 1..new-1, every row to the budget
    arg_bytes=memory.param_bytes(dec.model.state, per_device=True),
    detail=f"P {width} +{new}, cache {caps[-1]}",
    params=dict(f32_weights=config.dtype == "float32"),
  )
