"""Process-level setup shared by the command-line entry points."""

from __future__ import annotations

import os

from absl import logging


def setup_cli():
  """Quiet absl INFO logs (unless -v was given) and persist compiled programs across runs.

  The XLA compilation cache lives in $CODI_JAX_CACHE (default ~/.cache/codi_jax/xla); set it to
  an empty string to disable.
  """
  if logging.get_verbosity() <= logging.INFO and not os.environ.get("CODI_JAX_VERBOSE"):
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel

  cache = os.environ.get("CODI_JAX_CACHE", os.path.expanduser("~/.cache/codi_jax/xla"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
