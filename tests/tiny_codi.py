r"""A seconds-long CODI run for tests: the demo config shrunk (2 layers, d=32, 200 examples).

python -m codi_jax.train --config=tests/tiny_codi.py --workdir=/tmp/tiny --config.optim.num_steps=12

Also the smaller pieces tests build from: the base config's codi section for one method, a
3-row batch for the CODI loss, and a finished run's parameters.
"""

import numpy as np

from configs import base, demo


def get_config(method=None):
  c = demo.get_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.d_ff = 2, 32, 2, 64
  c.tokenizer = "train_bpe:300"
  c.data.synthetic.train, c.data.synthetic.valid = 200, 24
  c.data.batch_size = 8
  c.codi.num_latent = 2
  c.codi.method = method or "codi"
  c.optim.num_steps = 6
  c.eval.every_steps = 3
  c.eval.batch_size = 16
  c.eval.max_new_tokens = 6
  c.log_every = 1
  return c


def codi_config(method, **overrides):
  """The base config's codi section with `method` and `overrides` set."""
  c = base.get_config().codi
  c.method = method
  c.update(overrides)
  return c


def loss_batch(
  rng,
  vocab,
  question_lens,
  teacher_lens,
  teacher_distill_index,
  *,
  teacher_width=None,
  bot=None,
  eot=None,
):
  """A numpy batch for the CODI loss, ids drawn from `rng` below `vocab`: left-padded questions
  of `question_lens` (as wide as the longest; the last token `bot` if given), right-padded decoder
  rows of lengths 7, 5, 6 (the first token `eot` if given), and teacher rows of `teacher_lens` in
  `teacher_width` slots (the longest row by default) with no loss on the question's slots."""
  B, Lq, La = len(question_lens), max(question_lens), 7
  Lt = teacher_width or max(teacher_lens)
  enc = rng.integers(0, vocab, (B, Lq))
  if bot is not None:
    enc[:, -1] = bot
  dec, tea = rng.integers(0, vocab, (B, La)), rng.integers(0, vocab, (B, Lt))
  if eot is not None:
    dec[:, 0] = eot
  enc_mask = np.arange(Lq)[None] >= Lq - np.array(question_lens)[:, None]
  dec_mask = np.arange(La)[None] < np.array([7, 5, 6])[:, None]
  tea_mask = np.arange(Lt)[None] < np.array(teacher_lens)[:, None]
  tea_labels = np.where(tea_mask, tea, -100)
  tea_labels[:, :Lq] = -100
  return dict(
    encoder_ids=enc,
    encoder_mask=enc_mask,
    decoder_ids=dec,
    decoder_mask=dec_mask,
    decoder_labels=np.where(dec_mask, dec, -100),
    teacher_ids=tea,
    teacher_mask=tea_mask,
    teacher_labels=tea_labels,
    decoder_distill_index=np.array([4, 3, 2]),
    teacher_distill_index=np.array(teacher_distill_index),
  )


def final_params(workdir) -> dict:
  """A finished run's parameters (from <workdir>/final) as {path: numpy array}."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from codi_jax import final  # pylint: disable=import-outside-toplevel

  state = nnx.state(final.load_final(str(workdir)).codi, nnx.Param)
  return {str(k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


def write_finished(workdir, config=None) -> str:
  """A finished run in `workdir` without training (untrained weights, saved as training saves
  them): for what reads final/ (export, evaluate). Returns the workdir."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from codi_jax import final  # pylint: disable=import-outside-toplevel
  from codi_jax import workdir as wd  # pylint: disable=import-outside-toplevel
  from codi_jax.codi import build  # pylint: disable=import-outside-toplevel
  from codi_jax.data import sources  # pylint: disable=import-outside-toplevel

  c = config or get_config()
  recs, _, _ = sources.load_records(c)
  codi, tok, special = build.build_model(c, build.build_tokenizer(c, recs))
  with wd.claim(str(workdir)) as path:
    final.save_final(path, nnx.state(codi, nnx.Param), c, tok, special, {"steps": 0})
  return str(workdir)
