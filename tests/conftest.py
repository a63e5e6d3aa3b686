"""Shared pytest setup: absl flags parsed (grain workers read them), CPU only, tiny HF references."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
