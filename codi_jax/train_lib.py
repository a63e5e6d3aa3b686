"""CODI training: data, model, optimizer, one jitted step, metrics, periodic validation, final save.

`train_and_evaluate(config, workdir)` is the whole run; `python -m codi_jax.train` only parses flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from codi_jax import checkpoint, sharding
from codi_jax import metrics as metrics_lib
from codi_jax.codi import inference
from codi_jax.codi.model import Codi, CodiConfig, codi_loss
from codi_jax.data import answers, readers, synthetic
from codi_jax.data.codi_batches import (
  SpecialIds,
  collate,
  fit_shapes,
  infer_distill_offset,
  tokenize_records,
)
from codi_jax.data.pipeline import codi_dataset
from codi_jax.errors import InputError
from codi_jax.metrics import MetricWriter
from codi_jax.models import config as mcfg
from codi_jax.models import loader, transformer
from codi_jax.models import tokenizer as tokmod
from codi_jax.models.params import split_trainable
from codi_jax.models.transformer import Transformer

SPECIAL_TOKENS = ("[PAD]", "<bot>", "<eot>")


# ------------------------------------------------------------------------------------------ data


def load_records(config):
  """(train records, validation records, reports). Validation is never the test split."""
  d = config.data
  if d.source == "synthetic":
    s = d.synthetic
    diff = synthetic.Difficulty.from_config(s.to_dict())
    kw = dict(include_last_cot=d.include_last_cot, keep_non_digit_answers=d.keep_non_digit_answers)
    train, rep_t = readers.prepare_train_records(
      synthetic.generate("train", s.train, seed=config.seed, difficulty=diff),
      kind="aug",
      source="synthetic:train",
      **kw,
    )
    valid, rep_v = readers.prepare_train_records(
      synthetic.generate("valid", s.valid, seed=config.seed, difficulty=diff),
      kind="aug",
      source="synthetic:valid",
      **kw,
    )
    return train, valid, {"train": rep_t, "valid": rep_v}
  kw = dict(include_last_cot=d.include_last_cot, keep_non_digit_answers=d.keep_non_digit_answers)
  records, rep = readers.read_train_set(d.source, d.path or None, **kw)
  if d.valid_path:
    valid, rep_v = readers.read_train_set(d.source, d.valid_path, **kw)
    return records, valid, {"train": rep, "valid": rep_v}
  rng = np.random.default_rng(config.seed)
  order = rng.permutation(len(records))
  n_valid = min(d.valid_size, len(records) // 10)
  valid = [records[i] for i in order[:n_valid]]
  train = [records[i] for i in order[n_valid:]]
  return train, valid, {"train": rep, "valid": {"source": "hold-out of train", "kept": len(valid)}}


def build_tokenizer(config, train_records):
  spec = config.tokenizer
  if spec == "gpt2":
    return tokmod.gpt2_default()
  if spec.startswith("train_bpe"):
    size = int(spec.split(":")[1]) if ":" in spec else 512
    texts = [
      f"{r['question']} {r['cot']} {answers.ANSWER_PROMPT} {r['answer']}" for r in train_records
    ]
    return tokmod.train_bpe(texts, size)
  if spec != "model":
    raise InputError(
      f"--config.tokenizer: unknown tokenizer {spec!r} (model | gpt2 | train_bpe:<vocab>)"
    )
  return None  # taken from the loaded model


# ----------------------------------------------------------------------------------------- model


def _lora(config):
  m = config.model
  return (
    mcfg.LoRAConfig(rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout)
    if m.lora_rank > 0
    else None
  )


def _scratch_config(config, tokenizer) -> mcfg.ModelConfig:
  m = config.model
  if tokenizer is None:
    raise InputError(
      "--config.tokenizer: a model trained from scratch needs a tokenizer (gpt2 or train_bpe)"
    )
  return mcfg.ModelConfig(
    arch=m.arch,
    vocab_size=m.vocab_size or tokenizer.vocab_size,
    num_layers=m.num_layers,
    d_model=m.d_model,
    num_heads=m.num_heads,
    num_kv_heads=m.num_kv_heads or m.num_heads,
    head_dim=m.d_model // m.num_heads,
    d_ff=m.d_ff,
    max_positions=m.max_positions,
    embed_dropout=m.dropout,
    attn_dropout=m.dropout,
    resid_dropout=m.dropout,
    dtype=m.dtype,
    param_dtype=m.param_dtype,
    lora=_lora(config),
  )


def add_special_tokens(tokenizer, base_vocab: int) -> SpecialIds:
  """Adds pad/bot/eot to the tokenizer; their ids are the 3 rows appended to the embedding table."""
  ids = tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
  if ids != list(range(base_vocab, base_vocab + 3)):
    # Tokenizers with fewer entries than the embedding table (padded vocabularies): place after the table.
    ids = list(range(base_vocab, base_vocab + 3))
  return SpecialIds(pad=ids[0], bot=ids[1], eot=ids[2], eos=tokenizer.eos_id)


def codi_config(config) -> CodiConfig:
  cc = config.codi.to_dict()
  ccfg = CodiConfig(**{f.name: cc[f.name] for f in dataclasses.fields(CodiConfig) if f.name in cc})
  if ccfg.method == "no_cot_sft":  # the student reads [question][bot][eot][answer]: no thoughts
    ccfg = dataclasses.replace(ccfg, num_latent=0)
  return ccfg


def _wrap(config, backbone: Transformer) -> Codi:
  """Grows the vocabulary by pad/bot/eot (mean resizing) and adds the projection."""
  backbone.resize_vocab(backbone.cfg.vocab_size + 3, jax.random.key(config.seed + 1))
  return Codi(backbone, codi_config(config), nnx.Rngs(params=config.seed + 2))


def build_model(config, tokenizer):
  """(Codi module, tokenizer, special ids), built eagerly (unsharded)."""
  m = config.model
  if m.spec:
    loaded = loader.load(
      m.spec, dtype=m.dtype, param_dtype=m.param_dtype, lora=_lora(config), seed=config.seed
    )
    backbone, tokenizer = loaded.model, tokenizer or loaded.tokenizer
  else:
    backbone = transformer.build(_scratch_config(config, tokenizer), seed=config.seed)
  special = add_special_tokens(tokenizer, backbone.cfg.vocab_size)
  return _wrap(config, backbone), tokenizer, special


def init_model(config, tokenizer, mesh, rules):
  """(Codi module with sharded parameters, tokenizer, special ids).

  From scratch: shapes first (`nnx.eval_shape`), then a jitted init whose outputs are created
  already sharded, so no device ever holds a full replica. Loaded weights are read and resized on
  the host CPU, then each device receives only its shard. The values are `build_model`'s (the
  jitted init may round the last float bit differently; tested within 1e-7).
  """
  m = config.model
  if not m.spec:
    mcfg_ = _scratch_config(config, tokenizer)
    special = add_special_tokens(tokenizer, mcfg_.vocab_size)

    def make():
      return _wrap(config, transformer.build(mcfg_, seed=config.seed))

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = sharding.state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state), tokenizer, special
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    codi, tokenizer, special = build_model(config, tokenizer)
  graphdef, state = nnx.split(codi)
  return nnx.merge(graphdef, sharding.shard_state(state, mesh, rules)), tokenizer, special


def make_optimizer(config, num_steps: int):
  """AdamW (no decay on biases and norms), warmup + cosine to 0, global-norm clipping, accumulation."""
  o = config.optim
  sched = optax.warmup_cosine_decay_schedule(
    0.0, o.lr, max(1, int(o.warmup_ratio * num_steps)), num_steps, 0.0
  )
  tx = optax.chain(
    optax.clip_by_global_norm(o.clip),
    optax.adamw(
      sched,
      b1=o.b1,
      b2=o.b2,
      eps=o.eps,
      weight_decay=o.weight_decay,
      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
    ),
  )
  if o.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum)
  return tx, sched


# ----------------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class Evaluator:
  """Jitted student/teacher answer decoding on fixed-shape validation batches (one compile each).

  With a mesh, batches are split along its batch axes and the decoded tokens come back
  replicated, so every process holds the full result.
  """

  graphdef: nnx.GraphDef
  special: SpecialIds
  tokenizer: tokmod.Tokenizer
  enc_ids: np.ndarray  # [n, Lq] (with bot), left-padded
  enc_mask: np.ndarray
  golds: list
  batch_size: int
  max_new: int
  num_latent: int
  mesh: Mesh | None = None
  rules: dict | None = None

  def __post_init__(self):
    sp = self.special
    eos = [sp.eos]
    suppress = (sp.pad, sp.bot, sp.eot)
    out = sharding.replicate_out(self.mesh)
    self._student = jax.jit(
      self._traced(
        lambda codi, ids, mask: inference.student_generate(
          codi,
          ids,
          mask,
          eot_id=sp.eot,
          max_new=self.max_new,
          eos_ids=eos,
          pad_id=sp.pad,
          suppress=suppress,
        )
      ),
      out_shardings=out,
    )
    self._teacher = jax.jit(
      self._traced(
        lambda codi, ids, mask: inference.teacher_generate(
          codi,
          ids[:, :-1],
          mask[:, :-1],
          max_new=self.max_new,
          eos_ids=eos,
          pad_id=sp.pad,
          suppress=suppress,
        )
      ),
      out_shardings=out,
    )

  def _traced(self, fn):
    def run(state, ids, mask):
      with sharding.activations(self.mesh, self.rules):
        return fn(nnx.merge(self.graphdef, *state), ids, mask)

    return run

  def run(self, state, which: str):
    """(accuracy, mean generated tokens, decoded texts) over the whole set."""
    fn = self._student if which == "student" else self._teacher
    n, B = len(self.golds), self.batch_size
    texts, lengths = [], []
    for i in range(0, n, B):
      idx = np.arange(i, i + B) % n  # the last batch repeats rows: same shape, no recompile
      ids, mask = (
        sharding.put_batch(x[idx], self.mesh, self.rules) for x in (self.enc_ids, self.enc_mask)
      )
      toks, lens = jax.device_get(fn(state, ids, mask))
      for j in range(min(B, n - i)):
        texts.append(self.tokenizer.decode(toks[j, : lens[j]].tolist(), skip_special_tokens=True))
        lengths.append(int(lens[j]))
    preds = [answers.extract_answer(t) for t in texts]
    return answers.accuracy(preds, self.golds), float(np.mean(lengths)), texts


def make_evaluator(
  graphdef, valid_examples, special, tokenizer, golds, config, num_latent, mesh=None, rules=None
):
  shapes = fit_shapes(valid_examples, config.data.buckets)
  batch = collate(list(valid_examples), shapes, special)
  n = config.eval.num_examples or len(golds)
  return Evaluator(
    graphdef,
    special,
    tokenizer,
    batch["encoder_ids"][:n],
    batch["encoder_mask"][:n],
    golds[:n],
    min(config.eval.batch_size, n),
    config.eval.max_new_tokens,
    num_latent,
    mesh,
    rules,
  )


# ----------------------------------------------------------------------------------------- training


def _check_workdir(workdir: str, config) -> str:
  """The checkpoint directory; refuses a finished workdir, and unasked-for restarts over checkpoints."""
  if "://" in workdir:
    raise InputError(
      f"--workdir: {workdir!r}: URLs are not supported; use a mounted path (e.g. gcsfuse or NFS)"
    )
  final = os.path.join(workdir, "final")
  if os.path.exists(final) and not config.overwrite:
    raise InputError(
      f"{workdir}: already holds a finished run ({final}); use a new --workdir or "
      "--config.overwrite=True"
    )
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = (
    sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []
  )
  if steps and not config.resume and not config.overwrite:
    raise InputError(
      f"{ckpt_dir}: holds checkpoints (steps {steps[0]}..{steps[-1]}); resume with "
      "--config.resume=True, or start over with --config.overwrite=True"
    )
  return ckpt_dir


def save_final(workdir, state, config, tokenizer, special, summary):
  """Parameters (orbax) plus everything needed to rebuild the model: config, tokenizer, special ids.

  Every process takes part in writing the (possibly sharded) parameters; process 0 writes the rest
  and moves `final.tmp/` to `final/` once all of it is on disk.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  final = os.path.join(os.path.abspath(workdir), "final")
  tmp = final + ".tmp"
  main = jax.process_index() == 0
  if main and os.path.exists(tmp):
    shutil.rmtree(tmp)
  multihost_utils.sync_global_devices("codi_jax:final:clean")
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(tmp, "params"), nnx.to_pure_dict(state))
  multihost_utils.sync_global_devices("codi_jax:final:params")
  if main:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    tokenizer.backend.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "run.json"), "w") as f:
      json.dump(
        {"special_ids": dataclasses.asdict(special), "eos_ids": list(tokenizer.eos_ids), **summary},
        f,
        indent=2,
      )
    if os.path.exists(final):
      shutil.rmtree(final)
    os.replace(tmp, final)
  multihost_utils.sync_global_devices("codi_jax:final:done")
  return final


def make_train_step(
  graphdef,
  tx,
  key,
  dropout_on: bool,
  traces: list | None = None,
  *,
  mesh=None,
  rules=None,
  shardings=None,
):
  """The jitted training step `(train_state, opt_state, frozen, batch, step) -> (train_state,
  opt_state, metrics)`: `codi_loss` + gradients + `tx` update, metrics with the gradient norm.

  Dropout keys are `fold_in(key, step)` when `dropout_on`; train and opt states are donated. Each
  trace appends to `traces` (if given), so callers can check the step compiles once. With a mesh,
  `shardings` = (train, opt, frozen, batch) pins the in/out shardings and activations follow `rules`.
  """

  def train_step(train_state, opt_state, frozen, batch, step):
    if traces is not None:
      traces.append(1)  # trace-time only: counts compiles
    rng = jax.random.fold_in(key, step) if dropout_on else None

    def loss_fn(ts):
      return codi_loss(nnx.merge(graphdef, ts, frozen), batch, rng)

    with sharding.activations(mesh, rules):
      (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_state)
      updates, opt_state = tx.update(grads, opt_state, train_state)
      metrics["grad_norm"] = optax.tree.norm(grads)
      return optax.apply_updates(train_state, updates), opt_state, metrics

  if shardings is None:
    return jax.jit(train_step, donate_argnums=(0, 1))
  train_sh, opt_sh, frozen_sh, batch_sh = shardings
  repl = sharding.replicated(mesh)
  return jax.jit(
    train_step,
    in_shardings=(train_sh, opt_sh, frozen_sh, batch_sh, repl),
    out_shardings=(train_sh, opt_sh, repl),
    donate_argnums=(0, 1),
  )


def compile_ahead(step_fn, args, mesh) -> Any:
  """Lowers and compiles the step before step one and prints its per-device memory use."""
  t0 = time.time()
  compiled = step_fn.lower(*args).compile()

  def mib(b):
    return f"{b / 2**20:.1f} MiB"

  line = f"compiled train step in {time.time() - t0:.1f} s on mesh {dict(mesh.shape)}"
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    m = None
  if m is not None:
    line += (
      f": per device arguments {mib(m.argument_size_in_bytes)}, outputs {mib(m.output_size_in_bytes)} "
      f"(donated/aliased {mib(m.alias_size_in_bytes)}), temporaries {mib(m.temp_size_in_bytes)}"
    )
  if jax.process_index() == 0:
    print(line, flush=True)
  return compiled


# Config keys a resumed run may change; everything else must match the checkpoint's config.
_RESUMABLE_CHANGES = (
  "mesh",
  "logical_axis_rules",
  "checkpoint",
  "eval",
  "log_every",
  "workdir",
  "resume",
  "overwrite",
)


def _key_data(key) -> np.ndarray:
  return np.asarray(jax.random.key_data(key))


def _check_resumable(saved: dict, config, where: str):
  now = json.loads(config.to_json_best_effort())
  diff = sorted(
    k for k in set(saved) | set(now) if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k)
  )
  if diff:
    raise InputError(
      f"{where}: written with a different config ({', '.join(diff)} differ); resume with the "
      "same settings, or start over with --config.overwrite=True or a new --workdir"
    )


class Preemption:
  """SIGTERM -> stop at the next step boundary (all processes agree on which) and checkpoint."""

  def __init__(self):
    self._flag = False
    self._multi = jax.process_count() > 1
    self._old = None
    if not self._multi:  # multi-process: jax's preemption service receives the signal
      try:
        self._old = signal.signal(signal.SIGTERM, self._on_signal)
      except ValueError:  # not the main thread: no handler, as multi-process
        self._old = None

  def _on_signal(self, signum, frame):
    del signum, frame
    self._flag = True

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag

  def close(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) one training job; returns the final summary (also in <workdir>/final/run.json).

  On SIGTERM it checkpoints and returns early with summary["preempted"] = True; a non-finite
  loss raises FloatingPointError without saving anything after the last good checkpoint.
  """
  # --- Set-up -------------------------------------------------------------------------------------
  ckpt_dir = _check_workdir(workdir, config)
  t_start = time.time()
  main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.logical_axis_rules)
  B = config.data.batch_size
  split = sharding.batch_axes_size(mesh, rules)
  if B % split or B % jax.process_count():
    raise InputError(
      f"--config.data.batch_size: {B} must be a multiple of the batch mesh axes ({split} devices) "
      f"and of the {jax.process_count()} processes"
    )
  if config.overwrite:  # asked to start over: old checkpoints and metrics go
    if main and os.path.isdir(ckpt_dir):
      shutil.rmtree(ckpt_dir)
    metrics_lib.truncate(workdir, 0)
    multihost_utils.sync_global_devices("codi_jax:overwrite")
  train_recs, valid_recs, reports = load_records(config)
  tokenizer = build_tokenizer(config, train_recs)
  codi, tokenizer, special = init_model(config, tokenizer, mesh, rules)
  logging.info("data: %s", json.dumps(reports))

  # --- Data -----------------------------------------------------------------------------------------
  offset = infer_distill_offset(tokenizer)
  tok_kw = dict(
    pad_id=special.pad,
    bot_id=special.bot,
    eot_id=special.eot,
    distill_offset=offset,
    max_token_num=config.data.max_token_num,
  )
  train_ex, train_rep = tokenize_records(train_recs, tokenizer, **tok_kw)
  valid_ex, _ = tokenize_records(valid_recs, tokenizer, **{**tok_kw, "max_token_num": 10**9})
  if train_rep.get("dropped", {}).get("over_max_token_num"):
    logging.warning(
      "%d training examples exceed max_token_num=%d and were left out",
      train_rep["dropped"]["over_max_token_num"],
      config.data.max_token_num,
    )
  shapes = fit_shapes(train_ex, config.data.buckets)
  micro = config.optim.grad_accum
  steps_per_epoch = max(1, len(train_ex) // B // micro)
  num_steps = config.optim.num_steps or int(math.ceil(config.optim.epochs * steps_per_epoch))
  it = iter(codi_dataset(train_ex, shapes, batch_size=B, seed=config.seed))
  if main:
    print(
      f"data: {len(train_ex)} train / {len(valid_ex)} valid examples, shapes {shapes}, "
      f"{num_steps} steps ({steps_per_epoch}/epoch), distill offset {offset}",
      flush=True,
    )

  # --- Model, optimizer, shardings, step -----------------------------------------------------------
  full_ft = config.model.lora_rank == 0 or not config.model.spec
  if full_ft:
    graphdef, train_state, frozen = nnx.split(codi, nnx.Param, ...)  # frozen: empty
  else:
    graphdef, train_state, frozen = split_trainable(
      codi, extra=("prj", "special") if codi.cfg.train_special_embeddings else ("prj",)
    )
  train_sh = sharding.state_shardings(train_state, mesh, rules)
  frozen_sh = sharding.state_shardings(frozen, mesh, rules)
  tx, sched = make_optimizer(config, num_steps)  # MultiSteps advances the schedule once per step
  opt_sh = sharding.optimizer_shardings(tx, train_state, train_sh, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(train_state)
  n_train = sum(x.size for x in jax.tree.leaves(train_state))
  n_all = n_train + sum(x.size for x in jax.tree.leaves(frozen))
  if main:
    print(
      f"model: {codi.backbone.cfg.arch} d={codi.backbone.cfg.d_model} L={codi.backbone.cfg.num_layers}, "
      f"{n_train:,} trainable / {n_all:,} parameters, method={codi.cfg.method}",
      flush=True,
    )
    for line in sharding.describe(train_state, train_sh):
      logging.info("param %s", line)
  dropout_on = any(
    r > 0
    for r in (
      codi.backbone.cfg.embed_dropout,
      codi.backbone.cfg.attn_dropout,
      codi.backbone.cfg.resid_dropout,
      codi.cfg.prj_dropout,
    )
  ) or (codi.backbone.cfg.lora is not None and codi.backbone.cfg.lora.dropout > 0)
  start = it.get_state()
  local = next(it)
  it.set_state(start)  # that batch only gave the shapes
  example = sharding.global_batch({k: v for k, v in local.items() if k != "index"}, mesh, rules)
  batch_sh = {k: v.sharding for k, v in example.items()}
  traces = []
  key = jax.random.key(config.seed)
  step_fn = make_train_step(
    graphdef,
    tx,
    key,
    dropout_on,
    traces,
    mesh=mesh,
    rules=rules,
    shardings=(train_sh, opt_sh, frozen_sh, batch_sh),
  )
  step_fn = compile_ahead(step_fn, (train_state, opt_state, frozen, example, jnp.int32(1)), mesh)
  num_latent = (
    codi.cfg.num_latent if config.codi.num_latent_infer < 0 else config.codi.num_latent_infer
  )
  eval_graphdef = (
    graphdef
    if num_latent == codi.cfg.num_latent
    else nnx.split(
      Codi(codi.backbone, dataclasses.replace(codi.cfg, num_latent=num_latent), nnx.Rngs(0)),
      nnx.Param,
      ...,
    )[0]
  )
  golds = [answers.gold_answer(r["answer"]) for r in valid_recs]
  evaluator = make_evaluator(
    eval_graphdef, valid_ex, special, tokenizer, golds, config, num_latent, mesh, rules
  )

  # --- Checkpoints and resume ----------------------------------------------------------------------
  ck = config.checkpoint
  best = ck.best_metric
  if best == "auto":
    best = "valid/teacher_acc" if codi.cfg.method == "cot_sft" else "valid/student_acc"
  ckpts = checkpoint.Checkpoints(
    ckpt_dir,
    save_every=ck.every_steps,
    keep=ck.keep,
    best_metric=best,
    best_mode=ck.best_mode,
    async_save=ck.async_save,
  )
  start_step = 0
  resumed = None
  if config.resume and ckpts.steps():
    abstract = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
      {"params": train_state, "opt": opt_state},
      {"params": train_sh, "opt": opt_sh},
    )
    abstract.update(
      step=np.zeros((), np.int32), rng=_key_data(key)
    )  # host values: every process has them
    _check_resumable(ckpts.newest_meta().get("config", {}), config, ckpt_dir)
    resumed = ckpts.restore(abstract, it)
    if resumed is not None:
      start_step, st, meta = resumed
      train_state, opt_state = st["params"], st["opt"]
      if not meta["data_restored"]:  # another process count: reposition by the step
        it.set_state({"next_index": start_step * micro})
      metrics_lib.truncate(workdir, start_step)
      if main:
        print(
          f"resumed from {ckpt_dir}/{start_step} (step {start_step} of {num_steps})", flush=True
        )
  writer = MetricWriter(workdir)

  def evaluate(step):
    res = {}
    state = (train_state, frozen)
    if codi.cfg.method in ("codi", "no_cot_sft"):
      res["valid/student_acc"], res["valid/student_tokens"], _ = evaluator.run(state, "student")
    if codi.cfg.method in ("codi", "cot_sft"):
      res["valid/teacher_acc"], res["valid/teacher_tokens"], _ = evaluator.run(state, "teacher")
    writer.write_scalars(step, res)
    if main:
      print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()), flush=True)
    return res

  def save(step, metrics=None):
    state = {
      "params": train_state,
      "opt": opt_state,
      "step": np.asarray(step, np.int32),
      "rng": _key_data(key),
    }
    meta = {
      "step": step,
      "process_count": jax.process_count(),
      "mesh": dict(mesh.shape),
      "config": json.loads(config.to_json_best_effort()),
    }
    ckpts.save(step, state, it, meta, metrics)

  # --- Loop ------------------------------------------------------------------------------------------
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  pending = None
  last_eval = {}
  preempted = False
  preemption = Preemption()
  bar = tqdm(
    total=num_steps,
    initial=start_step,
    desc="train",
    unit="step",
    dynamic_ncols=True,
    disable=not main,
  )
  t_loop = time.time()
  try:
    for step in range(start_step + 1, num_steps + 1):
      for _ in range(micro):
        local = next(it)
        batch = sharding.global_batch({k: v for k, v in local.items() if k != "index"}, mesh, rules)
        train_state, opt_state, metrics = step_fn(
          train_state, opt_state, frozen, batch, jnp.int32(step)
        )
      if pending is not None:  # metrics one step late: the host never waits on the device
        _report(pending, writer, bar, sched, config)
      pending = (step, metrics)
      bar.update(1)
      is_eval = step % config.eval.every_steps == 0 or step == num_steps
      stop = preemption.reached(step)
      if is_eval or stop or ckpts.should_save(step):
        _report(pending, writer, bar, sched, config)  # a checkpoint only follows a finite loss
        pending = None
        if is_eval:
          last_eval = evaluate(step)
        save(step, last_eval if is_eval else None)
      if stop:
        preempted = True
        break
  finally:
    bar.close()
    preemption.close()
    ckpts.close()  # waits for in-flight saves: the last good checkpoint is complete
  train_seconds = time.time() - t_loop
  summary = {
    "steps": num_steps,
    "train_seconds": round(train_seconds, 1),
    "step_compiles": len(traces),
    "total_seconds": round(time.time() - t_start, 1),
    "resumed_from": start_step if resumed else None,
  }
  if preempted:
    writer.close()
    summary.update(preempted=True, stopped_at=step, checkpoint=os.path.join(ckpt_dir, str(step)))
    if main:
      print(
        f"preempted at step {step}: checkpoint {summary['checkpoint']} written; rerun the same command "
        "to resume",
        flush=True,
      )
    return summary
  if (
    not last_eval
  ):  # resumed at the last step: the final evaluation was not recorded in this session
    last_eval = evaluate(num_steps)
  summary.update(last_eval)
  params = nnx.state(nnx.merge(graphdef, train_state, frozen).sync_special_rows(), nnx.Param)
  final = save_final(workdir, params, config, tokenizer, special, summary)
  writer.close()
  summary["final"] = final if main else None
  if main:
    print("final: " + json.dumps(summary), flush=True)
  return summary


def _report(pending, writer, bar, sched, config):
  step, metrics = pending
  m = jax.device_get(metrics)
  if not np.isfinite(m["loss"]):
    raise FloatingPointError(f"non-finite loss {m['loss']} at step {step}")
  if step % config.log_every == 0 or step == 1:
    writer.write_scalars(step, {**m, "lr": sched(step)})
  bar.set_postfix(
    {
      k: f"{float(v):.3f}"
      for k, v in m.items()
      if k in ("loss", "ce_student", "ce_teacher", "distill")
    }
  )
