"""Shared pytest setup: absl flags parsed (grain workers read them), CPU only, tiny HF references,
and one XLA compile cache per test process for the entry points the tests run in subprocesses."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# CLI tests (cli_util.run_module) run the same programs many times: they share a compile cache
# for the session, one folder per pytest-xdist worker (JAX writes cache entries non-atomically, so
# two processes must not share one). The process that made the root removes it at exit.
if "CODI_JAX_TEST_CACHE_ROOT" not in os.environ:
  os.environ["CODI_JAX_TEST_CACHE_ROOT"] = tempfile.mkdtemp(prefix="codi_jax_test_xla_")
  atexit.register(shutil.rmtree, os.environ["CODI_JAX_TEST_CACHE_ROOT"], ignore_errors=True)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
