"""Output files written atomically (a temporary file in the same directory, then a rename), so a
reader never sees half a file and an interrupted run leaves the previous version in place."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same directory and a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  write_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
  write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
