r"""A seconds-long CODI run for tests: the demo config shrunk (2 layers, d=32, 200 examples).

python -m codi_jax.train --config=tests/tiny_codi.py --workdir=/tmp/tiny --config.optim.num_steps=12
"""

from configs import demo


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
