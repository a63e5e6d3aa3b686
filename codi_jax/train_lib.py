"""CODI training: data, model, optimizer, one jitted step, metrics, periodic validation, final save.

`train_and_evaluate(config, workdir)` is the whole run; `python -m codi_jax.train` only parses flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from codi_jax.codi import inference
from codi_jax.codi.model import Codi, CodiConfig, codi_loss
from codi_jax.data import answers, readers, synthetic
from codi_jax.data.codi_batches import collate, fit_shapes, infer_distill_offset, tokenize_records, SpecialIds
from codi_jax.data.pipeline import codi_dataset
from codi_jax.errors import InputError
from codi_jax.metrics import MetricWriter
from codi_jax.models import config as mcfg
from codi_jax.models import loader, transformer
from codi_jax.models import tokenizer as tokmod
from codi_jax.models.params import split_trainable

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
        synthetic.generate("train", s.train, seed=config.seed, difficulty=diff), kind="aug", source="synthetic:train", **kw)
    valid, rep_v = readers.prepare_train_records(
        synthetic.generate("valid", s.valid, seed=config.seed, difficulty=diff), kind="aug", source="synthetic:valid", **kw)
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
    texts = [f"{r['question']} {r['cot']} {answers.ANSWER_PROMPT} {r['answer']}" for r in train_records]
    return tokmod.train_bpe(texts, size)
  if spec != "model":
    raise InputError(f"--config.tokenizer: unknown tokenizer {spec!r} (model | gpt2 | train_bpe:<vocab>)")
  return None  # taken from the loaded model


# ----------------------------------------------------------------------------------------- model


def build_model(config, tokenizer):
  """(Codi module, tokenizer, special ids). Grows the vocabulary by pad/bot/eot (mean resizing)."""
  m = config.model
  lora = (mcfg.LoRAConfig(rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout)
          if m.lora_rank > 0 else None)
  if m.spec:
    loaded = loader.load(m.spec, dtype=m.dtype, param_dtype=m.param_dtype, lora=lora, seed=config.seed)
    backbone, tokenizer = loaded.model, tokenizer or loaded.tokenizer
  else:
    if tokenizer is None:
      raise InputError("--config.tokenizer: a model trained from scratch needs a tokenizer (gpt2 or train_bpe)")
    heads = m.num_heads
    cfg = mcfg.ModelConfig(
        arch=m.arch, vocab_size=m.vocab_size or tokenizer.vocab_size, num_layers=m.num_layers, d_model=m.d_model,
        num_heads=heads, num_kv_heads=m.num_kv_heads or heads, head_dim=m.d_model // heads, d_ff=m.d_ff,
        max_positions=m.max_positions, embed_dropout=m.dropout, attn_dropout=m.dropout,
        resid_dropout=m.dropout, dtype=m.dtype, param_dtype=m.param_dtype, lora=lora)
    backbone = transformer.build(cfg, seed=config.seed)
  base_vocab = backbone.cfg.vocab_size
  ids = tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
  if ids != list(range(base_vocab, base_vocab + 3)):
    # Tokenizers with fewer entries than the embedding table (padded vocabularies): place after the table.
    ids = list(range(base_vocab, base_vocab + 3))
  backbone.resize_vocab(base_vocab + 3, jax.random.key(config.seed + 1))
  eos = tokenizer.eos_id
  special = SpecialIds(pad=ids[0], bot=ids[1], eot=ids[2], eos=eos)
  cc = config.codi.to_dict()
  ccfg = CodiConfig(**{f.name: cc[f.name] for f in dataclasses.fields(CodiConfig) if f.name in cc})
  if ccfg.method == "no_cot_sft":  # the student reads [question][bot][eot][answer]: no thoughts
    ccfg = dataclasses.replace(ccfg, num_latent=0)
  return Codi(backbone, ccfg, nnx.Rngs(params=config.seed + 2)), tokenizer, special


def make_optimizer(config, num_steps: int):
  """AdamW (no decay on biases and norms), warmup + cosine to 0, global-norm clipping, accumulation."""
  o = config.optim
  sched = optax.warmup_cosine_decay_schedule(0.0, o.lr, max(1, int(o.warmup_ratio * num_steps)), num_steps, 0.0)
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip),
      optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                  mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  if o.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum)
  return tx, sched


# ----------------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class Evaluator:
  """Jitted student/teacher answer decoding on fixed-shape validation batches (one compile each)."""

  graphdef: nnx.GraphDef
  special: SpecialIds
  tokenizer: tokmod.Tokenizer
  enc_ids: np.ndarray  # [n, Lq] (with bot), left-padded
  enc_mask: np.ndarray
  golds: list
  batch_size: int
  max_new: int
  num_latent: int

  def __post_init__(self):
    sp = self.special
    eos = [sp.eos]
    suppress = (sp.pad, sp.bot, sp.eot)
    self._student = jax.jit(lambda state, ids, mask: inference.student_generate(
        nnx.merge(self.graphdef, *state), ids, mask, eot_id=sp.eot, max_new=self.max_new, eos_ids=eos,
        pad_id=sp.pad, suppress=suppress))
    self._teacher = jax.jit(lambda state, ids, mask: inference.teacher_generate(
        nnx.merge(self.graphdef, *state), ids[:, :-1], mask[:, :-1], max_new=self.max_new, eos_ids=eos,
        pad_id=sp.pad, suppress=suppress))

  def run(self, state, which: str):
    """(accuracy, mean generated tokens, decoded texts) over the whole set."""
    fn = self._student if which == "student" else self._teacher
    n, B = len(self.golds), self.batch_size
    texts, lengths = [], []
    for i in range(0, n, B):
      idx = np.arange(i, i + B) % n  # the last batch repeats rows: same shape, no recompile
      toks, lens = jax.device_get(fn(state, jnp.asarray(self.enc_ids[idx]), jnp.asarray(self.enc_mask[idx])))
      for j in range(min(B, n - i)):
        texts.append(self.tokenizer.decode(toks[j, : lens[j]].tolist(), skip_special_tokens=True))
        lengths.append(int(lens[j]))
    preds = [answers.extract_answer(t) for t in texts]
    return answers.accuracy(preds, self.golds), float(np.mean(lengths)), texts


def make_evaluator(graphdef, valid_examples, special, tokenizer, golds, config, num_latent):
  shapes = fit_shapes(valid_examples, config.data.buckets)
  batch = collate(list(valid_examples), shapes, special)
  n = config.eval.num_examples or len(golds)
  return Evaluator(graphdef, special, tokenizer, batch["encoder_ids"][:n], batch["encoder_mask"][:n], golds[:n],
                   min(config.eval.batch_size, n), config.eval.max_new_tokens, num_latent)


# ----------------------------------------------------------------------------------------- training


def _check_workdir(workdir: str, overwrite: bool):
  final = os.path.join(workdir, "final")
  if os.path.exists(final) and not overwrite:
    raise InputError(f"{workdir}: already holds a finished run ({final}); use a new --workdir or "
                     "--config.overwrite=True")


def save_final(workdir, state, config, tokenizer, special, summary):
  """Parameters (orbax) plus everything needed to rebuild the model: config, tokenizer, special ids."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  final = os.path.join(os.path.abspath(workdir), "final")
  tmp = final + ".tmp"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(tmp, "params"), nnx.to_pure_dict(state))
  with open(os.path.join(tmp, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  tokenizer.backend.save(os.path.join(tmp, "tokenizer.json"))
  with open(os.path.join(tmp, "run.json"), "w") as f:
    json.dump({"special_ids": dataclasses.asdict(special), "eos_ids": list(tokenizer.eos_ids), **summary}, f, indent=2)
  if os.path.exists(final):
    shutil.rmtree(final)
  os.replace(tmp, final)
  return final


def make_train_step(graphdef, tx, key, dropout_on: bool, traces: list | None = None):
  """The jitted training step `(train_state, opt_state, frozen, batch, step) -> (train_state,
  opt_state, metrics)`: `codi_loss` + gradients + `tx` update, metrics with the gradient norm.

  Dropout keys are `fold_in(key, step)` when `dropout_on`; train and opt states are donated. Each
  trace appends to `traces` (if given), so callers can check the step compiles once.
  """

  def train_step(train_state, opt_state, frozen, batch, step):
    if traces is not None:
      traces.append(1)  # trace-time only: counts compiles
    rng = jax.random.fold_in(key, step) if dropout_on else None

    def loss_fn(ts):
      return codi_loss(nnx.merge(graphdef, ts, frozen), batch, rng)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_state)
    updates, opt_state = tx.update(grads, opt_state, train_state)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return optax.apply_updates(train_state, updates), opt_state, metrics

  return jax.jit(train_step, donate_argnums=(0, 1))


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs one training job; returns the final summary (also written to <workdir>/final/run.json)."""
  # --- Set-up -------------------------------------------------------------------------------------
  _check_workdir(workdir, config.overwrite)
  t_start = time.time()
  writer = MetricWriter(workdir)
  train_recs, valid_recs, reports = load_records(config)
  tokenizer = build_tokenizer(config, train_recs)
  codi, tokenizer, special = build_model(config, tokenizer)
  logging.info("data: %s", json.dumps(reports))

  # --- Data -----------------------------------------------------------------------------------------
  offset = infer_distill_offset(tokenizer)
  tok_kw = dict(pad_id=special.pad, bot_id=special.bot, eot_id=special.eot, distill_offset=offset,
                max_token_num=config.data.max_token_num)
  train_ex, train_rep = tokenize_records(train_recs, tokenizer, **tok_kw)
  valid_ex, _ = tokenize_records(valid_recs, tokenizer, **{**tok_kw, "max_token_num": 10**9})
  if train_rep.get("dropped", {}).get("over_max_token_num"):
    logging.warning("%d training examples exceed max_token_num=%d and were left out",
                    train_rep["dropped"]["over_max_token_num"], config.data.max_token_num)
  shapes = fit_shapes(train_ex, config.data.buckets)
  B = config.data.batch_size
  steps_per_epoch = max(1, len(train_ex) // (B * jax.process_count()) // config.optim.grad_accum)
  num_steps = config.optim.num_steps or int(math.ceil(config.optim.epochs * steps_per_epoch))
  ds = codi_dataset(train_ex, shapes, batch_size=B, seed=config.seed)
  it = iter(ds)
  print(f"data: {len(train_ex)} train / {len(valid_ex)} valid examples, shapes {shapes}, "
        f"{num_steps} steps ({steps_per_epoch}/epoch), distill offset {offset}", flush=True)

  # --- Model, optimizer, step ----------------------------------------------------------------------
  full_ft = config.model.lora_rank == 0 or not config.model.spec
  if full_ft:
    graphdef, train_state, frozen = nnx.split(codi, nnx.Param, ...)  # frozen: empty
  else:
    graphdef, train_state, frozen = split_trainable(
        codi, extra=("prj", "special") if codi.cfg.train_special_embeddings else ("prj",))
  tx, sched = make_optimizer(config, num_steps)  # MultiSteps advances the schedule once per step
  opt_state = tx.init(train_state)
  n_train = sum(x.size for x in jax.tree.leaves(train_state))
  n_all = n_train + sum(x.size for x in jax.tree.leaves(frozen))
  print(f"model: {codi.backbone.cfg.arch} d={codi.backbone.cfg.d_model} L={codi.backbone.cfg.num_layers}, "
        f"{n_train:,} trainable / {n_all:,} parameters, method={codi.cfg.method}", flush=True)
  dropout_on = any(r > 0 for r in (codi.backbone.cfg.embed_dropout, codi.backbone.cfg.attn_dropout,
                                   codi.backbone.cfg.resid_dropout, codi.cfg.prj_dropout)) or (
                                       codi.backbone.cfg.lora is not None and codi.backbone.cfg.lora.dropout > 0)
  traces = []
  step_fn = make_train_step(graphdef, tx, jax.random.key(config.seed), dropout_on, traces)
  num_latent = codi.cfg.num_latent if config.codi.num_latent_infer < 0 else config.codi.num_latent_infer
  eval_graphdef = graphdef if num_latent == codi.cfg.num_latent else nnx.split(
      Codi(codi.backbone, dataclasses.replace(codi.cfg, num_latent=num_latent), nnx.Rngs(0)), nnx.Param, ...)[0]
  golds = [answers.gold_answer(r["answer"]) for r in valid_recs]
  evaluator = make_evaluator(eval_graphdef, valid_ex, special, tokenizer, golds, config, num_latent)

  def evaluate(step):
    res = {}
    state = (train_state, frozen)
    if codi.cfg.method in ("codi", "no_cot_sft"):
      res["valid/student_acc"], res["valid/student_tokens"], _ = evaluator.run(state, "student")
    if codi.cfg.method in ("codi", "cot_sft"):
      res["valid/teacher_acc"], res["valid/teacher_tokens"], _ = evaluator.run(state, "teacher")
    writer.write_scalars(step, res)
    print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()), flush=True)
    return res

  # --- Loop ------------------------------------------------------------------------------------------
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  micro = config.optim.grad_accum
  pending = None
  last_eval = {}
  bar = tqdm(total=num_steps, desc="train", unit="step", dynamic_ncols=True, disable=jax.process_index() != 0)
  t_loop = time.time()
  for step in range(1, num_steps + 1):
    for _ in range(micro):
      batch = {k: jnp.asarray(v) for k, v in next(it).items() if k != "index"}
      train_state, opt_state, metrics = step_fn(train_state, opt_state, frozen, batch, jnp.int32(step))
    if pending is not None:  # metrics one step late: the host never waits on the device
      _report(pending, writer, bar, sched, config)
    pending = (step, metrics)
    bar.update(1)
    if step % config.eval.every_steps == 0 or step == num_steps:
      _report(pending, writer, bar, sched, config)
      pending = None
      last_eval = evaluate(step)
  bar.close()
  train_seconds = time.time() - t_loop
  summary = {"steps": num_steps, "train_seconds": round(train_seconds, 1), "step_compiles": len(traces),
             "total_seconds": round(time.time() - t_start, 1), **last_eval}
  params = nnx.state(nnx.merge(graphdef, train_state, frozen).sync_special_rows(), nnx.Param)
  final = save_final(workdir, params, config, tokenizer, special, summary) if jax.process_index() == 0 else None
  writer.close()
  summary["final"] = final
  print("final: " + json.dumps(summary), flush=True)
  return summary


def _report(pending, writer, bar, sched, config):
  step, metrics = pending
  m = jax.device_get(metrics)
  if not np.isfinite(m["loss"]):
    raise FloatingPointError(f"non-finite loss {m['loss']} at step {step}; nothing saved")
  if step % config.log_every == 0 or step == 1:
    writer.write_scalars(step, {**m, "lr": sched(step)})
  bar.set_postfix({k: f"{float(v):.3f}" for k, v in m.items() if k in ("loss", "ce_student", "ce_teacher", "distill")})
