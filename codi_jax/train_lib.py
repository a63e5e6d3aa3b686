"""CODI training: data, model, optimizer, one jitted step, metrics, periodic validation, final save.

(Over 400 lines: one sectioned run, `train_and_evaluate` with its `Trainer` and `Validator`, read
top to bottom in one file as the style guide's train loop; the step itself is train_step.py.)

`train_and_evaluate(config, workdir)` is the whole run; `python -m codi_jax.train` only parses flags.
The baselines (config.codi.method coconut | icot_si) train through the same loop: their curriculum
(`data.curriculum.Curriculum`) rewrites each batch on the host, picks the stage's compiled step
(Coconut: one compile per thought count) and restarts the optimizer, all as functions of the step.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from codi_jax import checkpoint, files, final, sharding, train_options, train_state, train_step
from codi_jax import metrics as metrics_lib
from codi_jax import workdir as workdir_lib
from codi_jax.batching import bucket_size
from codi_jax.codi import build
from codi_jax.codi.decoder import CodiDecoder
from codi_jax.codi.model import BASELINES, Codi, CodiOptions
from codi_jax.data import answers, curriculum, pipeline
from codi_jax.data.codi_batches import infer_distill_offset
from codi_jax.data.eval_sets import config_task
from codi_jax.data.sources import load_records
from codi_jax.errors import InputError
from codi_jax.metrics import MetricWriter
from codi_jax.models import memory
from codi_jax.models.jitted import JittedModel


class Validator:
  """Student/teacher accuracy on the validation split, decoded with the live training state.

  Every question is padded to one width (the longest, bucketed), so each mode compiles once.
  """

  def __init__(self, model: JittedModel, special, tokenizer, valid_recs, config):
    n = config.eval.num_examples or len(valid_recs)
    recs = valid_recs[:n]
    self.tokenizer, self.task = tokenizer, config_task(config)
    self.questions = [tokenizer.encode(r["question"], add_special_tokens=True) for r in recs]
    self.golds = [answers.gold_answer(r["answer"], self.task) for r in recs]
    self.batch_size = min(config.eval.batch_size, n)
    width = bucket_size(max(len(q) for q in self.questions) + 1, config.data.buckets)
    self.decoder = CodiDecoder(
      model,
      special,
      tokenizer.eos_ids,
      opts=CodiOptions.from_config(config.codi, inference=True),
      max_new_tokens=config.eval.max_new_tokens,
      buckets=[width],
    )

  def accuracy(self, state, mode: str, num_latent: int | None = None) -> tuple[float, float]:
    """(accuracy, mean generated tokens) of `mode` (student | teacher) over the set."""
    out = self.decoder.generate(
      self.questions, mode, self.batch_size, state=state, num_latent=num_latent
    )
    texts = [self.tokenizer.decode(d.tokens, skip_special_tokens=True) for d in out]
    preds = [answers.extract_answer(t, self.task) for t in texts]
    return answers.accuracy(preds, self.golds), float(np.mean([len(d.tokens) for d in out]))


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) one training job; returns the final summary (also in <workdir>/final/run.json).

  The run holds an exclusive lock on `workdir` and happens inside the one mesh context built from
  `config.mesh` and `config.logical_axis_rules`. On SIGTERM it checkpoints and returns early with
  summary["preempted"] = True; a non-finite loss raises FloatingPointError without saving anything
  after the last good checkpoint. The config is validated first (`train_options.validate_train`).
  Nothing already in `workdir` changes until the whole set-up has succeeded (data, tokenizer,
  model, state and, for a fresh start, the first step's compile and memory check); then
  `config.overwrite` moves the previous run aside (`_set_aside`). A refused start removes the
  directories it created (`workdir.claim`, and checkpoints/ here).
  """
  train_options.validate_train(config)
  with workdir_lib.claim(workdir) as path:
    ckpt_dir = _prepare_workdir(path, config)
    had_ckpt_dir = files.as_path(ckpt_dir).exists()
    mesh = sharding.make_mesh(config.mesh)
    with sharding.use_mesh(mesh, sharding.rules_from_config(config.logical_axis_rules)):
      trainer = None
      try:
        trainer = Trainer(config, path, ckpt_dir)
        if config.overwrite or not (config.resume and trainer.ckpts.steps()):
          trainer._step_fn(1)  # pylint: disable=protected-access  (compiled: its memory check)
      except BaseException:
        if trainer is not None:
          trainer.ckpts.close()
        if not had_ckpt_dir and jax.process_index() == 0:
          workdir_lib.remove_empty([ckpt_dir])
        raise
      if config.overwrite:
        _set_aside(path, trainer)
      if not config.optim.num_steps and jax.process_index() == 0:
        print(
          f"steps: optim.num_steps=0, so optim.epochs={config.optim.epochs:g} epochs = "
          f"{trainer.num_steps:,} steps; set --config.optim.num_steps for a fixed count",
          flush=True,
        )
      return trainer.run()


def _prepare_workdir(workdir: str, config) -> str:
  """The checkpoint directory; refuses a finished workdir and unasked-for restarts over
  checkpoints. Changes nothing (`_set_aside` moves a previous run once the set-up succeeded).
  Local or gs://: every access goes through etils.epath."""
  final_dir = files.as_path(workdir) / "final"
  # On an object store final/ is written in place, run.json last (final.py): that marks it done.
  done = final_dir / "run.json" if files.is_url(final_dir) else final_dir
  if done.exists() and not config.overwrite:
    raise InputError(
      f"{workdir}: already holds a finished run ({final_dir}); use a new --workdir or "
      "--config.overwrite=True"
    )
  ckpt_dir = files.as_path(workdir) / "checkpoints"
  steps = (
    sorted(int(d.name) for d in ckpt_dir.iterdir() if d.name.isdigit()) if ckpt_dir.is_dir() else []
  )
  if steps and not config.resume and not config.overwrite:
    raise InputError(
      f"{ckpt_dir}: holds checkpoints (steps {steps[0]}..{steps[-1]}); resume with "
      "--config.resume=True, or start over with --config.overwrite=True"
    )
  return str(ckpt_dir)


# What a run writes into its workdir (codi_jax.evaluate: eval/), moved aside by an overwrite.
RUN_ARTEFACTS = (
  "final",
  "final.tmp",
  "eval",
  "metrics.jsonl",
  "tb",
  "checkpoints",
  "checkpoints.corrupt",
)


def move_previous_run(workdir) -> str | None:
  """Renames the RUN_ARTEFACTS present in `workdir` into a new `<workdir>/previous-<UTC time>/`
  and returns it (None if there were none). Nothing is deleted: that folder is kept until the
  user removes it. Each rename is atomic locally; on an object store a rename is a copy and a
  delete. Anything else in the workdir stays."""
  root = files.as_path(workdir)
  present = [root / name for name in RUN_ARTEFACTS if (root / name).exists()]
  if not present:
    return None
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
  for n in itertools.count():
    dest = root / (f"previous-{stamp}" + (f"-{n}" if n else ""))
    if dest.exists():
      continue
    try:
      dest.mkdir()
      break
    except FileExistsError:  # another start took it meanwhile
      continue
  for path in present:
    path.rename(dest / path.name)
  return str(dest)


def _set_aside(workdir: str, trainer: Trainer) -> None:
  """config.overwrite, once the set-up has succeeded: the previous run's artefacts go to
  `<workdir>/previous-<UTC time>/` (`move_previous_run`; kept, never deleted), and the trainer's
  checkpoint manager, opened on the old checkpoints, is reopened on the empty directory."""
  trainer.ckpts.close()
  if jax.process_index() == 0:
    moved = move_previous_run(workdir)
    if moved:
      print(
        f"overwrite: moved the previous run "
        f"({', '.join(sorted(p.name for p in files.as_path(moved).iterdir()))}) to {moved}; "
        "it is kept: delete it when no longer needed",
        flush=True,
      )
  multihost_utils.sync_global_devices("codi_jax:overwrite")
  trainer._init_checkpoints()  # pylint: disable=protected-access


class Trainer:
  """One training run (inside the mesh context): set-up in `__init__`, the loop in `run`."""

  def __init__(self, config, workdir: str, ckpt_dir: str):
    self.config, self.workdir, self.ckpt_dir = config, workdir, ckpt_dir
    self.t_start = time.time()
    self.main = jax.process_index() == 0
    self.opts = CodiOptions.from_config(config.codi)
    self._check_batch()
    train_recs, valid_recs, reports = load_records(config)
    tokenizer = build.build_tokenizer(config, train_recs)
    codi, self.tokenizer, self.special = build.init_model(config, tokenizer)
    logging.info("data: %s", json.dumps(reports))
    self._init_data(train_recs, len(valid_recs))
    self._init_state(codi)
    model = JittedModel(graphdef=self.graphdef)  # weights passed per call: the live state
    self.validator = Validator(model, self.special, self.tokenizer, valid_recs, config)
    self._init_checkpoints()

  # --- Set-up ------------------------------------------------------------------------------------

  def _check_batch(self):
    B = self.config.data.batch_size
    split = sharding.batch_axes_size()
    if B % split or B % jax.process_count():
      raise InputError(
        f"--config.data.batch_size: {B} must be a multiple of the batch mesh axes ({split} "
        f"devices) and of the {jax.process_count()} processes"
      )

  def _init_data(self, train_recs, n_valid: int):
    config, special = self.config, self.special
    offset = infer_distill_offset(self.tokenizer)
    method = self.opts.method
    make = (
      functools.partial(curriculum.train_data, method)
      if method in BASELINES
      else pipeline.train_data
    )
    self.data = make(
      train_recs,
      self.tokenizer,
      pad_id=special.pad,
      bot_id=special.bot,
      eot_id=special.eot,
      batch_size=config.data.batch_size,
      seed=config.seed,
      buckets=config.data.buckets,
      max_padding=config.data.max_padding,
      distill_offset=offset,
      max_token_num=config.data.max_token_num,
    )
    dropped = self.data.report.get("dropped", {}).get("over_max_token_num")
    if dropped:
      logging.warning(
        "%d training examples exceed max_token_num=%d and were left out",
        dropped,
        config.data.max_token_num,
      )
    self.micro = config.optim.grad_accum
    per_epoch = max(1, self.data.steps_per_epoch // self.micro)
    self.num_steps = config.optim.num_steps or int(math.ceil(config.optim.epochs * per_epoch))
    local = config.data.batch_size // jax.process_count()
    self.curriculum = curriculum.Curriculum(
      method,
      config.codi,
      steps_per_epoch=per_epoch,
      longest_cot=curriculum.longest_cot(self.data.examples) if method == "icot_si" else 0,
      cot_steps=self.data.examples.num_steps() if method == "coconut" else None,
      seed=config.seed,
      pad_id=special.pad,
      first_row=jax.process_index() * local,
      global_rows=config.data.batch_size,
    )
    self.it = iter(self.data.dataset)
    if self.main:
      print(
        f"data: {len(self.data.examples)} train / {n_valid} valid examples, shapes "
        f"{self.data.shapes}, {self.num_steps} steps ({per_epoch}/epoch), distill offset "
        f"{offset}",
        flush=True,
      )

  def _init_state(self, codi: Codi):
    """Trainable/frozen split, optimizer, shardings and the step's compile inputs
    (`train_state`, shared with `codi_jax.compile`; compiled ahead of its first use, once per
    static option set: `_step_fn`)."""
    config = self.config
    s = train_state.split(codi, config, self.num_steps)
    self.graphdef, self.train_state, self.frozen = s.graphdef, s.train_state, s.frozen
    self.train_sh, self.tx, self.sched, self.opt_sh = s.train_sh, s.tx, s.sched, s.opt_sh
    self.opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sh)(self.train_state)
    n_train, n_all = s.num_params
    if self.main:
      m = codi.backbone.cfg
      print(
        f"model: {m.arch} d={m.d_model} L={m.num_layers}, {n_train:,} trainable / {n_all:,} "
        f"parameters, method={self.opts.method}",
        flush=True,
      )
      for line in sharding.describe(self.train_state, self.train_sh):
        logging.info("param %s", line)
    start = self.it.get_state()
    example = sharding.global_batch(self.curriculum.batch(next(self.it), 1))
    self.it.set_state(start)  # that batch only gave the shapes
    self.shardings, self.step_args = train_state.step_args(s, self.opt_state, example)
    self.traces, self.step_fns = [], {}
    self.key = jax.random.key(config.seed)
    self.dropout = train_step.dropout_on(codi, config)
    self.restart = train_step.make_restart(self.tx, self.opt_sh)

  def _step_fn(self, step: int, preemption: checkpoint.Preemption | None = None):
    """The compiled step for `step`'s options (Coconut: the stage's thought count). A signal
    during its compile raises checkpoint.Interrupted (`Preemption.wait`); without `preemption`
    (set-up, before `run`: nothing to save yet) this call installs its own handlers."""
    opts = self.opts
    n = self.curriculum.num_latent(step)
    if n is not None:
      opts = dataclasses.replace(opts, num_latent=n)
    if opts not in self.step_fns:
      fn = train_step.make_train_step(
        self.graphdef,
        self.tx,
        self.key,
        opts,
        self.dropout,
        self.traces,
        shardings=self.shardings,
      )
      own = preemption is None
      preemption = preemption or checkpoint.Preemption()
      try:
        compiled = train_step.compile_ahead(fn, self.step_args, preemption.wait)
        if own and preemption.signum is not None:  # came just after the compile
          raise checkpoint.Interrupted("", 128 + preemption.signum)
      except checkpoint.Interrupted as e:
        if not own:
          raise
        name = signal.Signals(e.code - 128).name
        raise checkpoint.Interrupted(
          f"{name} while compiling the train step: nothing to save yet; rerun the same command "
          "to start",
          e.code,
          e.abandoned,
        ) from None
      finally:
        if own:
          preemption.close()
      self.step_fns[opts] = memory.check_compiled(compiled, "--config: the train step")
    return self.step_fns[opts]

  def _init_checkpoints(self):
    ck = self.config.checkpoint
    best = ck.best_metric
    if best == "auto":
      best = f"valid/{_MODES[self.opts.method][0]}_acc"
    self.ckpts = checkpoint.Checkpoints(
      self.ckpt_dir,
      save_every=ck.every_steps,
      keep=ck.keep,
      best_metric=best,
      best_mode=ck.best_mode,
      async_save=ck.async_save,
    )

  # --- Resume, evaluation, saving ----------------------------------------------------------------

  def restore(self) -> int | None:
    """The step restored from the newest readable checkpoint (None if nothing was restored)."""
    if not (self.config.resume and self.ckpts.steps()):
      return None
    abstract = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
      {"params": self.train_state, "opt": self.opt_state},
      {"params": self.train_sh, "opt": self.opt_sh},
    )
    # Host values every process has.
    abstract.update(step=np.zeros((), np.int32), rng=checkpoint.key_data(self.key))
    saved = self.ckpts.newest_meta().get("config", {})
    checkpoint.check_resumable(saved, self.config, self.ckpt_dir)
    resumed = self.ckpts.restore(abstract, self.it)
    if resumed is None:
      return None
    step, st, meta = resumed
    self.train_state, self.opt_state = st["params"], st["opt"]
    if not meta["data_restored"]:  # another process count: reposition by the step
      self.it.set_state({"next_index": step * self.micro})
    metrics_lib.truncate(self.workdir, step)
    if self.main:
      print(f"resumed from {self.ckpt_dir}/{step} (step {step} of {self.num_steps})", flush=True)
    return step

  def evaluate(self, step: int) -> dict:
    """Validation accuracy and generated tokens of the method's decoding modes at `step` (Coconut:
    with the thoughts of the stage reached)."""
    res = {}
    for mode in _MODES[self.opts.method]:
      acc, tokens = self.validator.accuracy(
        (self.train_state, self.frozen), mode, self.curriculum.eval_latent(step)
      )
      res[f"valid/{mode}_acc"], res[f"valid/{mode}_tokens"] = acc, tokens
    self.writer.write_scalars(step, res)
    if self.main:
      print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()), flush=True)
    return res

  def save(self, step: int, metrics=None):
    state = {
      "params": self.train_state,
      "opt": self.opt_state,
      "step": np.asarray(step, np.int32),
      "rng": checkpoint.key_data(self.key),
    }
    meta = {
      "step": step,
      "process_count": jax.process_count(),
      "mesh": dict(sharding.current()[0].shape),
      "config": json.loads(self.config.to_json_best_effort()),
    }
    self.ckpts.save(step, state, self.it, meta, metrics)

  # --- The loop ----------------------------------------------------------------------------------

  def run(self) -> dict:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    resumed = self.restore()
    start = resumed or 0
    self.writer = MetricWriter(self.workdir)
    pending, last_eval, stop_step = None, {}, None
    preemption = checkpoint.Preemption()
    bar = tqdm(
      total=self.num_steps,
      initial=start,
      desc="train",
      unit="step",
      dynamic_ncols=True,
      disable=not self.main,
    )
    t_loop = time.time()
    try:
      for step in range(start + 1, self.num_steps + 1):
        try:
          step_fn = self._step_fn(step, preemption)
        except checkpoint.Interrupted as e:  # the steps since the last checkpoint are kept
          if pending is not None:
            self._report(pending, bar)
            self.save(step - 1)
          kept = f"checkpoint {os.path.join(self.ckpt_dir, str(step - 1))} written"
          if pending is None:
            kept = "nothing new to save" if step - 1 > start else "nothing to save yet"
          self.writer.close()
          raise checkpoint.Interrupted(
            f"{e.message} for step {step}: {kept}; rerun the same command to resume",
            e.code,
            e.abandoned,
          ) from None
        if self.curriculum.reset_before(step):
          self.opt_state = self.restart(self.opt_state, self.train_state)
        for micro in range(self.micro):
          batch = sharding.global_batch(self.curriculum.batch(next(self.it), step, micro))
          self.train_state, self.opt_state, metrics = step_fn(
            self.train_state, self.opt_state, self.frozen, batch, jnp.int32(step)
          )
        if pending is not None:  # metrics one step late: the host never waits on the device
          self._report(pending, bar)
        pending = (step, metrics)
        bar.update(1)
        is_eval = step % self.config.eval.every_steps == 0 or step == self.num_steps
        stop = preemption.reached(step)
        if is_eval or stop or self.ckpts.should_save(step):
          self._report(pending, bar)  # a checkpoint only follows a finite loss
          pending = None
          if is_eval:
            last_eval = self.evaluate(step)
          self.save(step, last_eval if is_eval else None)
        if stop:
          stop_step = step
          break
    finally:
      bar.close()
      preemption.close()
      self.ckpts.close()  # waits for in-flight saves: the last good checkpoint is complete
    summary = {
      "steps": self.num_steps,
      "train_seconds": round(time.time() - t_loop, 1),
      "step_compiles": len(self.traces),
      "total_seconds": round(time.time() - self.t_start, 1),
      "resumed_from": resumed,
    }
    if stop_step is not None:
      return self._preempted(summary, stop_step, preemption.signum)
    if not last_eval:  # resumed at the last step: its evaluation was not recorded in this session
      last_eval = self.evaluate(self.num_steps)
    summary.update(last_eval)
    params = nnx.state(nnx.merge(self.graphdef, self.train_state, self.frozen), nnx.Param)
    path = final.save_final(
      self.workdir, params, self.config, self.tokenizer, self.special, summary
    )
    self.writer.close()
    summary["final"] = path if self.main else None
    if self.main:
      print("final: " + json.dumps(summary), flush=True)
      accs = [f"{k[6:-4]} {100 * v:.1f}%" for k, v in last_eval.items() if k.endswith("_acc")]
      note = self.config.eval.baseline_note
      print("validation accuracy: " + ", ".join(accs) + (f" ({note})" if note else ""), flush=True)
    return summary

  def _preempted(self, summary: dict, step: int, signum: int | None) -> dict:
    """SIGTERM (or the preemption service): the summary; SIGINT (Ctrl-C): checkpoint.Interrupted."""
    self.writer.close()
    ckpt = os.path.join(self.ckpt_dir, str(step))
    if signum == signal.SIGINT:
      raise checkpoint.Interrupted(
        f"interrupted at step {step}: checkpoint {ckpt} written; rerun the same command to resume",
        128 + signum,
      )
    summary.update(preempted=True, stopped_at=step, checkpoint=ckpt)
    if self.main:
      print(
        f"preempted at step {step}: checkpoint {ckpt} written; rerun the same command to resume",
        flush=True,
      )
    return summary

  def _report(self, pending, bar):
    step, metrics = pending
    m = jax.device_get(metrics)
    if not np.isfinite(m["loss"]):
      raise FloatingPointError(f"non-finite loss {m['loss']} at step {step}")
    if step % self.config.log_every == 0 or step == 1:
      host = self.curriculum.scalars(step)
      self.writer.write_scalars(step, {**m, "lr": self.sched(step), **host})
    shown = ("loss", "ce_student", "ce_teacher", "distill")
    bar.set_postfix({k: f"{float(v):.3f}" for k, v in m.items() if k in shown})


# Validation modes per method (the first one picks the best checkpoint under best_metric="auto").
_MODES = {
  "codi": ("student", "teacher"),
  "cot_sft": ("teacher",),
  "no_cot_sft": ("student",),
  "coconut": ("student",),  # [Q][bot] + thoughts + [eot], then greedy
  "icot_si": ("teacher",),  # greedy from the question: the CoT is internalized
}
