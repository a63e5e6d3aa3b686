r"""Train CODI (or the CoT-SFT / No-CoT-SFT baselines).

  python -m codi_jax.train --config=configs/demo.py
  python -m codi_jax.train --config=configs/gpt2.py --workdir=runs/gpt2 --config.optim.lr=3e-3
  python -m codi_jax.train --config=configs/gpt2.py --workdir=runs/gpt2 --config.mesh.fsdp=-1 --config.mesh.data=1

A rerun with the same --workdir resumes from its newest complete checkpoint. SIGTERM (preemption)
checkpoints and exits 0; a non-finite loss stops with exit 1 and leaves the last good checkpoint.
Multi-host runs (launch/) initialize jax.distributed from the environment (codi_jax/distributed.py).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from codi_jax import runtime
from codi_jax.errors import exit_on_input_error

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

  with exit_on_input_error("codi_jax.train"):
    distributed.maybe_initialize()

  try:
    config = _CONFIG.value
    workdir = _WORKDIR.value or config.workdir
  except OSError as e:  # the config file is loaded lazily: missing file or an error inside it
    first = [line.strip() for line in str(e).splitlines() if line.strip()]
    print(f"codi_jax.train: error: --config: {first[-1] if first else e}", file=sys.stderr)
    sys.exit(2)
  with exit_on_input_error("codi_jax.train"):
    if not workdir:
      from codi_jax.errors import InputError  # pylint: disable=import-outside-toplevel

      raise InputError("--workdir: no output directory (set --workdir or config.workdir)")
    try:
      train_lib.train_and_evaluate(config, workdir)
    except FloatingPointError as e:
      ckpt = os.path.join(workdir, "checkpoints")
      print(
        f"codi_jax.train: error: {e}; stopped, the last good checkpoint stays in {ckpt}",
        file=sys.stderr,
      )
      sys.exit(1)


def parse_flags(argv):
  """absl parsing, with config-override mistakes reported in one line (exit 2) instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"codi_jax.train: error: {e}", file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    print(
      f"codi_jax.train: error: invalid config override {str(e).strip(chr(34))} "
      f"(overrides given: {', '.join(bad) or 'none'})",
      file=sys.stderr,
    )
  sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
