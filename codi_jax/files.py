"""Output files on local disks and object stores (gs://, s3://: any `etils.epath` path, the API
Orbax uses), each written so that a reader never sees half a file.

Locally: a temporary file in the same directory, then a rename, so an interrupted run leaves the
previous version in place. On an object store one write is already atomic (the object appears whole
or not at all) and a rename is a copy, so the object is written directly.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from typing import Any

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
  """Whether `path` names an object store (gs://bucket/...) rather than a local file."""
  return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: URLs as given, local paths made absolute."""
  path = os.fspath(path)
  return epath.Path(path if is_url(path) else os.path.abspath(path))


def write_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path`: locally through a temporary file in the same directory and a rename;
  on an object store in one write."""
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_url(path):
    path.write_text(text)
    return
  tmp = path.parent / f".tmp_{uuid.uuid4().hex}{path.name}"
  try:
    tmp.write_text(text)
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
  write_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
  write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
