r"""Decode from any supported model: greedy, token sampling, Soft Thinking and its stochastic variants.

  python -m soft_jax.generate --model=smollm2 --prompt="What is 12 + 7?" --max_new_tokens=32 --chat
  python -m soft_jax.generate --model=smollm2 --mode=gumbel --gumbel_tau=0.5 --prompt="..." --json
  python -m soft_jax.generate --config=configs/soft/smollm2.py:dirichlet --prompt="..." --json
  python -m soft_jax.generate --model=/path/to/hf_dir --prompt="..." --json

--model takes an alias (smollm2), a local HF directory, a .gguf file or a hub id. --mode is one of
greedy (the default; the fast greedy Generator), sample, soft, dirichlet, gumbel. --config reads a
configs/soft/*.py file; flags given on the command line win over it, and sampler flags not given
anywhere take the Soft Thinking defaults (soft_jax.sampling.SamplerParams). With --json the last
line of stdout is one JSON object (`results` holds one such object per prompt when several --prompt
flags are given), with the mode, the thinking length and every sampling parameter.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from codi_jax import runtime
from codi_jax.errors import InputError, exit_on_input_error
from soft_jax import cli_common, decode, thinking
from soft_jax.cli_common import encode_prompt, sampler_params

PROG = "soft_jax.generate"


def _define_flags():
  """This program's flags (defined only when run as a program: importing defines none)."""
  cli_common.define("decode", "extrapolation", "prompt", "sampler")
  flags.DEFINE_bool(
    "chat", False, "Wrap each prompt as a user turn with the model's chat template."
  )
  flags.DEFINE_bool("json", False, "End stdout with one JSON line.")


def _thinking_length(tokens: list[int], think_end_id: int | None) -> int:
  """Greedy Generator path: tokens up to and including the first `</think>` (all if none)."""
  if think_end_id is not None and think_end_id in tokens:
    return tokens.index(think_end_id) + 1
  return len(tokens)


def run(
  model_spec: str,
  prompts: list[str],
  max_new: int,
  *,
  chat: bool,
  dtype: str,
  bucket: int,
  mode: str = "greedy",
  params=None,
  seed: int = 0,
  think_end: str = "auto",
  think_end_last_id: bool = False,
  allow_extrapolation: bool = False,
) -> list[dict]:
  """Loads the model, generates for every prompt in one batch, returns one record per prompt.

  mode=greedy without a thinking budget uses the greedy Generator; every other case SoftDecoder.
  Under a mesh context (`sharding.use_mesh`) the weights are sharded and the batch split. Before
  decoding: the prompts plus `max_new` must fit the model's positions (past them only for RoPE
  models with `allow_extrapolation`), and the decoder refuses a call whose memory cannot fit.
  """
  # Imported here so that flag errors answer without loading JAX.
  from codi_jax.decoding import Generator  # pylint: disable=import-outside-toplevel
  from codi_jax.models import loader, memory  # pylint: disable=import-outside-toplevel

  if not prompts:
    raise InputError("--prompt: no prompt given")
  for i, p in enumerate(prompts):
    if not p.strip():
      raise InputError(f"--prompt: prompt {i + 1} is empty")
  if max_new < 1:
    raise InputError(f"--max_new_tokens: must be >= 1, got {max_new}")
  if bucket < 1:
    raise InputError(f"--length_bucket: must be >= 1, got {bucket}")
  params = sampler_params(mode) if params is None else params.validate(prefix="--")
  loaded = loader.load(model_spec, dtype=dtype, param_dtype=dtype)
  params.validate(prefix="--", vocab=loaded.config.vocab_size)
  tok = loaded.tokenizer
  end_id = thinking.resolve_think_end(tok, think_end, last_id=think_end_last_id)
  ids = [encode_prompt(tok, p, chat) for p in prompts]
  if chat and end_id is not None:
    ids = [thinking.open_thinking(tok, i) for i in ids]
  memory.check_positions(
    loaded.config, max(len(i) for i in ids), max_new, allow_extrapolation=allow_extrapolation
  )
  pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
  t0 = time.perf_counter()
  if params.mode == "greedy" and not params.max_thinking_tokens:
    gen = Generator(loaded.model, pad_id=pad, eos_ids=tok.eos_ids)
    outs = gen(ids, max_new, length_bucket=bucket)
    eos = set(tok.eos_ids)
    rows = [
      (o, _thinking_length(o, end_id), "eos" if o and o[-1] in eos else "length") for o in outs
    ]
  else:
    dec = decode.SoftDecoder(
      loaded.model, params, pad_id=pad, eos_ids=tok.eos_ids, think_end_id=end_id
    )
    outs = dec(ids, max_new_tokens=max_new, seed=seed, length_bucket=bucket)
    rows = [(r.tokens, r.thinking_tokens, r.stop_reason) for r in outs]
  seconds = time.perf_counter() - t0
  return [
    {
      "model": model_spec,
      "mode": params.mode,
      "prompt": p,
      "prompt_tokens": i,
      "tokens": o,
      "text": tok.decode(o, skip_special_tokens=True),
      "thinking_tokens": nt,
      "answer_text": tok.decode(o[nt:], skip_special_tokens=True),
      "stop_reason": stop,
      "seconds": round(seconds, 3),
      "seed": seed,
      "think_end_id": end_id,
      "dtype": dtype,
      "sampler": params.to_dict(),
    }
    for p, i, (o, nt, stop) in zip(prompts, ids, rows)
  ]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime.setup_cli()
  with exit_on_input_error(PROG):
    from codi_jax import distributed, sharding  # pylint: disable=import-outside-toplevel

    distributed.maybe_initialize()
    st = cli_common.settings(prog=PROG)
    with sharding.use_mesh(st.mesh, st.rules):
      records = run(
        st.model,
        cli_common.value("prompt") or [],
        st.max_new_tokens,
        chat=cli_common.setting("chat", st.config),
        dtype=st.dtype,
        bucket=st.length_bucket,
        mode=st.mode,
        params=st.params,
        seed=st.seed,
        think_end=st.think_end,
        think_end_last_id=st.think_end_last_id,
        allow_extrapolation=st.allow_extrapolation,
      )
  if not distributed.is_main():  # every process decoded the same batch; one prints it
    return
  for r in records:
    print(r["text"])
  if cli_common.value("json"):
    print(json.dumps(records[0] if len(records) == 1 else {"results": records}))
  sys.stdout.flush()


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=runtime.flags_parser(PROG))
