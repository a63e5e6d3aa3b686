r"""Train CODI (or the CoT-SFT / No-CoT-SFT baselines).

  python -m codi_jax.train --config=configs/demo.py
  python -m codi_jax.train --config=configs/gpt2.py --workdir=runs/gpt2 --config.optim.lr=3e-3
  python -m codi_jax.train --config=configs/gpt2.py --workdir=runs/gpt2 --config.mesh.fsdp=-1 --config.mesh.data=1

A rerun with the same --workdir resumes from its newest complete checkpoint. SIGTERM (preemption)
checkpoints and exits 0; Ctrl-C (SIGINT) checkpoints too, with one line and exit 130. Either signal
during a compile ends the run without waiting for it (one line, exit 130 / 143). A non-finite loss
stops with exit 1 and leaves the last good checkpoint.
Multi-host runs (launch/) initialize jax.distributed from the environment (codi_jax/distributed.py).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from codi_jax import runtime
from codi_jax.errors import exit_on_input_error

PROG = "codi_jax.train"
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: config.workdir).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime.setup_cli()
  from codi_jax import distributed, train_lib  # pylint: disable=import-outside-toplevel

  with exit_on_input_error(PROG):
    distributed.maybe_initialize()

  config = runtime.config_value(_CONFIG, PROG)
  workdir = _WORKDIR.value or config.workdir
  with exit_on_input_error(PROG):
    if not workdir:
      from codi_jax.errors import InputError  # pylint: disable=import-outside-toplevel

      raise InputError("--workdir: no output directory (set --workdir or config.workdir)")
    try:
      train_lib.train_and_evaluate(config, workdir)
    except KeyboardInterrupt as e:
      _interrupted(e)
    except FloatingPointError as e:
      ckpt = os.path.join(workdir, "checkpoints")
      print(
        f"codi_jax.train: error: {e}; stopped, the last good checkpoint stays in {ckpt}",
        file=sys.stderr,
      )
      sys.exit(1)


def _interrupted(e: KeyboardInterrupt):
  """Ctrl-C or a signal during a compile (checkpoint.Interrupted says where it stopped and what it
  saved) or elsewhere: one line, exit 128 + the signal. os._exit: an abandoned XLA compile thread
  must not be waited for; the checkpoints and the workdir lock are closed already."""
  message = getattr(e, "message", "") or (
    "interrupted; the checkpoints written so far are kept; rerun the same command to resume"
  )
  print(f"{PROG}: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(getattr(e, "code", 130))


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.flags_parser(PROG))
