"""The one place tests and experiments find the real data sets (GSM8k, SVAMP, GSM-Hard, ...).

DATA_ROOT is $CODI_JAX_SHARED_DATA if set, else the `shared/data` folder beside the repository.
`locate` has no pytest side effects (experiments use it); `path` skips the calling test when a file
is missing, or fails it when CODI_JAX_REQUIRE_DATA=1 (CI sets it, so a missing copy is an error).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_ROOT = "CODI_JAX_SHARED_DATA"
ENV_REQUIRE = "CODI_JAX_REQUIRE_DATA"
REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path:
  """The real data's root folder (it may not exist)."""
  root = os.environ.get(ENV_ROOT)
  return Path(root) if root else REPO.parent / "shared" / "data"


DATA_ROOT = data_root()


def locate(*parts: str) -> Path | None:
  """DATA_ROOT/parts if that file or folder exists, else None."""
  p = data_root().joinpath(*parts)
  return p if p.exists() else None


def path(*parts: str) -> Path:
  """DATA_ROOT/parts; if missing, skips the test (fails it when CODI_JAX_REQUIRE_DATA=1)."""
  found = locate(*parts)
  if found is not None:
    return found
  import pytest  # Here, not at the top: experiments import this module without pytest.

  message = (
    f"real data file {data_root().joinpath(*parts)} is missing; set {ENV_ROOT} to a folder "
    f"holding a copy (gsm8k/train.jsonl, svamp/SVAMP.json, ...)"
  )
  if os.environ.get(ENV_REQUIRE) == "1":
    pytest.fail(message)
  pytest.skip(message)
