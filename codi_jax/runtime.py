"""Process-level setup shared by the command-line entry points."""

from __future__ import annotations

import os

from absl import logging


def setup_cli(compile_cache: bool = True):
  """Quiet absl INFO logs (unless -v was given), keep an installed libtpu out of CPU-only hosts
  (`tpu.quiet_cpu_backend`) and persist compiled programs across runs.

  The XLA compilation cache lives in $CODI_JAX_CACHE (default ~/.cache/codi_jax/xla); set it to
  an empty string to disable. compile_cache=False: none, for a program that only compiles for
  devices it has no client for (`codi_jax.compile`: jax cannot load such an executable back).
  """
  if logging.get_verbosity() <= logging.INFO and not os.environ.get("CODI_JAX_VERBOSE"):
    logging.set_verbosity(logging.WARNING)
  from codi_jax import tpu  # pylint: disable=import-outside-toplevel

  tpu.quiet_cpu_backend()  # before any backend starts: libtpu without chips prints warnings
  import jax  # pylint: disable=import-outside-toplevel

  cache = os.environ.get("CODI_JAX_CACHE", os.path.expanduser("~/.cache/codi_jax/xla"))
  if cache and compile_cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def flags_parser(prog: str):
  """An absl `flags_parser` for `app.run`: a bad flag, config file (whatever its code raises) or
  `--config.x` override is one line on stderr (`prog: error: ...`) and exit 2, not a traceback."""
  import sys  # pylint: disable=import-outside-toplevel

  from absl import flags  # pylint: disable=import-outside-toplevel

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      message = lines[0] if len(lines) < 2 else f"{lines[0].rstrip(':')}: {lines[-1]}"
      # config_flags wraps a TypeError/ValueError of get_config with its traceback
      head, found, _ = lines[0].partition(": Error whilst parsing config file")
      if found:
        message = f"{head.removeprefix('flag ')}: {lines[-1]}"
    except Exception as e:  # noqa: BLE001  (code in a config file: what it raises is input)
      given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
      detail = " ".join(str(e).strip('"').split())
      files = [a.partition("=")[2] for a in argv[1:] if a.startswith("--config=")]
      if given and isinstance(e, AttributeError | KeyError | TypeError | ValueError):
        message = f"invalid config override {detail} (overrides given: {', '.join(given)})"
      elif files:
        message = f"--config={files[-1]}: {type(e).__name__}: {detail}"
      else:
        message = f"{type(e).__name__}: {detail}"
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)

  return parse


def config_value(holder, prog: str):
  """The value of a `config_flags` holder (loaded lazily, on first access); a missing config file
  or an error inside it is one line on stderr and exit 2."""
  import re  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  try:
    value = holder.value
    hasattr(value, "lock")  # a file that failed to load (missing) raises at the first attribute
    return value
  except OSError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    last = re.sub(r"^\[Errno \d+\] ", "", lines[-1]) if lines else str(e)
    print(f"{prog}: error: --config: {last}", file=sys.stderr)
    sys.exit(2)
