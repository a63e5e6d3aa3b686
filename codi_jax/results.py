"""Evaluation results that survive an interruption, shared by `codi_jax.evaluate`,
`soft_jax.evaluate` and `soft_jax.analyze`.

- `check_out`: the output directory is created and proven writable before any work.
- `Journal`: one result's records are appended to `<out>/<stem>.partial.jsonl` as each batch
  finishes (one flushed write per batch; the first line records what identifies the evaluation:
  model, settings, evaluation set). A rerun with the same identity resumes after the recorded
  records; another identity is refused in one line naming the first field that differs. The
  summary is written last (atomically, computed from the records, with an `identity` field) and the
  journal removed: the summary file marks a complete result.
- `read_complete`: a complete result of the same evaluation is kept (a rerun does not redo it); one
  of another evaluation is replaced only with --overwrite.
- `exit_on_interrupt`: Ctrl-C ends in one line (how far it got, where the partial results are) and
  exit status 130.

Object stores (gs://...: `files.as_path`) cannot append: there the journal is kept in memory and
rewritten whole after a batch at most every `_OBJECT_WRITE_S` seconds and when the run stops, so a
killed run loses at most those seconds of records.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import uuid
from typing import Any

from codi_jax import files, workdir
from codi_jax.errors import InputError

PARTIAL = ".partial.jsonl"
_OBJECT_WRITE_S = 1.0  # GCS takes about one write per second to one object


class Interrupted(Exception):
  """Ctrl-C during an evaluation; the message says how far it got and where its records are."""


@contextlib.contextmanager
def exit_on_interrupt(prog: str):
  """Turns Ctrl-C inside the block into one line on stderr and exit status 130."""
  try:
    yield
  except Interrupted as e:
    print(f"{prog}: {e}", file=sys.stderr, flush=True)
    sys.exit(130)
  except KeyboardInterrupt:
    print(
      f"{prog}: interrupted; finished results are kept; rerun the same command to resume",
      file=sys.stderr,
      flush=True,
    )
    sys.exit(130)


def check_out(path, *, what: str = "--out", hint: str = "") -> str:
  """`path` (a local directory or an object-store URL) created if missing and written to once, so
  that an unusable output location is a one-line InputError before any work; returns it absolute.
  `hint` is appended to the error (e.g. which flag to pass)."""
  tail = f"; {hint}" if hint else ""
  try:
    directory = workdir.check_workdir(path, what)
  except InputError as e:
    raise InputError(f"{e}{tail}") from None
  probe = files.as_path(directory) / f".write_test_{uuid.uuid4().hex}"
  try:
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  (OSError, or any object-store client error)
    detail = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}".splitlines()[0][:200]
    raise InputError(f"{what}: {path}: the directory is not writable ({detail}){tail}") from None
  return directory


_MODEL_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5", ".npz")
_MODEL_JSON = ("config.json", "tokenizer.json", "codi_config.json")


def fingerprint(path) -> str:
  """A cheap identity of a local model file or directory: the names, sizes and modification times
  of its weight files and configs (a directory: at its top level; outputs written beside them, as
  `<checkpoint>/eval/`, do not count), hashed; '' for a path that is not local."""
  path = os.fspath(path)
  if files.is_url(path) or not os.path.exists(path):
    return ""
  names = [""]
  if os.path.isdir(path):
    names = [n for n in sorted(os.listdir(path)) if n.endswith(_MODEL_FILES) or n in _MODEL_JSON]
  entries = []
  for name in names:
    st = os.stat(os.path.join(path, name) if name else path)
    entries.append([name, st.st_size, st.st_mtime_ns])
  return digest(entries)


def digest(obj) -> str:
  """sha256 of `obj` as canonical JSON (sorted keys): an evaluation set's or a record's identity."""
  text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def difference(old: Any, new: Any) -> str | None:
  """The first field (dotted path, sorted) whose value differs between two identities, as
  `field: <old> there, <new> now`; None if they are equal."""
  a, b = _flat(_normal(old)), _flat(_normal(new))
  for key in sorted(set(a) | set(b)):
    if a.get(key, _MISSING) != b.get(key, _MISSING):
      return f"{key}: {_short(a.get(key, _MISSING))} there, {_short(b.get(key, _MISSING))} now"
  return None


def read_complete(path, identity: dict, *, overwrite: bool, what: str = "--out") -> dict | None:
  """The result file at `path` if it is a complete result of the evaluation `identity` describes
  (kept: a rerun does not redo it); None if there is none or `overwrite`; a one-line InputError if
  it belongs to another evaluation (replaced only with --overwrite)."""
  p = files.as_path(path)
  if overwrite or not p.exists():
    return None
  try:
    old = json.loads(p.read_text())
  except (OSError, ValueError):  # a folder, unreadable, not JSON: not a result file
    old = None
  if not isinstance(old, dict) or "identity" not in old:
    diff = "it records no identity (an older version's output, or not a result file)"
  else:
    diff = difference(old["identity"], identity)
    if diff is None:
      return old
  raise InputError(
    f"{what}: {path} holds a complete result of another evaluation ({diff}); pass --overwrite to "
    "replace it, or choose another --out"
  )


class Records:
  """The finished items of one evaluation in memory: `done` maps each key (an int: the item's
  position) to its record; `cost` to the seconds and compiles of its batch (shared out)."""

  def __init__(self):
    self.done: dict[int, Any] = {}
    self.cost: dict[int, tuple[float, int]] = {}

  @property
  def seconds(self) -> float:
    """Seconds spent on the recorded items (over every session that added to them)."""
    return sum(s for s, _ in self.cost.values())

  @property
  def compiles(self) -> int:
    return sum(c for _, c in self.cost.values())

  def append(self, items, *, seconds: float = 0.0, compiles: int = 0) -> None:
    """Records one finished batch, `items` = [(key, record)]: its seconds are shared out over its
    items, its compiles go to the first."""
    items = list(items)
    if not items:
      return
    costs = [(seconds / len(items), compiles if j == 0 else 0) for j in range(len(items))]
    self._write(items, costs)
    for (k, r), c in zip(items, costs):
      self.done[k], self.cost[k] = r, c

  def _write(self, items, costs) -> None:
    del items, costs  # in memory only


class Journal(Records):
  """`Records` on disk as they finish, resumable (module docstring); used as a context manager
  around the work (Ctrl-C inside becomes `Interrupted`). `complete` is the kept summary when the
  result is already complete (nothing to run), else None."""

  def __init__(
    self,
    directory,
    stem: str,
    identity: dict,
    *,
    summary: str,
    total: int,
    unit: str = "problems",
    label: str = "",
    overwrite: bool = False,
    what: str = "--out",
  ):
    super().__init__()
    self.directory = str(directory)
    root = files.as_path(directory)
    self.path, self.summary_path = root / (stem + PARTIAL), root / summary
    self.identity = _normal(identity)
    self.total, self.unit, self.label, self.what = total, unit, label, what
    self.overwrite = overwrite
    self._keep = 0  # bytes of an existing journal to keep (its whole lines)
    self._lines: list[str] | None = None  # object stores: the whole journal, rewritten
    self._written = self._wrote_at = 0.0
    self.complete = read_complete(self.summary_path, identity, overwrite=overwrite, what=what)
    if self.complete is None and not overwrite and self.path.exists():
      self._load()

  def _load(self) -> None:
    raw = self.path.read_bytes()
    lines = raw.split(b"\n")[:-1]  # a last line without its newline is a torn write: dropped
    try:
      header = json.loads(lines[0]) if lines else None
    except ValueError:
      header = None
    if not isinstance(header, dict) or "identity" not in header:
      raise InputError(
        f"{self.what}: {self.path} is not a readable partial result; pass --overwrite to discard "
        "it, or choose another --out"
      )
    diff = difference(header["identity"], self.identity)
    if diff is not None:
      raise InputError(
        f"{self.what}: {self.path} holds partial results of another evaluation ({diff}); rerun "
        "with the same settings to resume, pass --overwrite to discard them, or choose another --out"
      )
    offset = len(lines[0]) + 1
    for line in lines[1:]:
      try:
        row = json.loads(line)
        key, record = int(row["key"]), row["record"]
        cost = (float(row["seconds"]), int(row["compiles"]))
      except (ValueError, TypeError, KeyError):
        break  # damaged from here on: those items are run again
      self.done[key], self.cost[key] = record, cost
      offset += len(line) + 1
    self._keep = offset

  # ------------------------------------------------------------------------------------- writing

  def __enter__(self) -> Journal:
    if self.complete is not None:
      return self
    header = json.dumps({"identity": self.identity}, ensure_ascii=False) + "\n"
    remote = files.is_url(self.path)
    if self._keep:  # resume after the whole lines (a torn or damaged tail is cut off)
      raw = self.path.read_bytes()
      text = raw[: self._keep].decode()
      if remote:
        self._lines, self._written = [text], 1
      elif len(raw) > self._keep:
        files.write_atomic(self.path, text)
      return self
    if self.overwrite:  # the old result stops counting as complete before anything is redone
      self.summary_path.unlink(missing_ok=True)
    if remote:
      self._lines = [header]
      self._flush(force=True)
    else:
      files.write_atomic(self.path, header)
    return self

  def __exit__(self, kind, value, tb) -> None:
    if self._lines is not None:
      self._flush(force=True)
    if kind is not None and issubclass(kind, KeyboardInterrupt):
      where = f" of {self.label}" if self.label else ""
      raise Interrupted(
        f"interrupted after {len(self.done)} of {self.total} {self.unit}{where}; partial results "
        f"in {self.directory}; rerun the same command to resume"
      ) from None

  def _write(self, items, costs) -> None:
    """One finished batch in one flushed write (object stores: into the journal rewritten whole)."""
    lines = [
      json.dumps({"key": k, "seconds": s, "compiles": c, "record": r}, ensure_ascii=False) + "\n"
      for (k, r), (s, c) in zip(items, costs)
    ]
    if self._lines is not None:
      self._lines.extend(lines)
      self._flush()
    else:
      with self.path.open("a") as f:
        f.write("".join(lines))
        f.flush()

  def _flush(self, force: bool = False) -> None:
    """Object stores: rewrites the journal whole (one write: never half an object)."""
    if len(self._lines) == self._written:
      return
    if force or time.monotonic() - self._wrote_at >= _OBJECT_WRITE_S:
      self.path.write_text("".join(self._lines))
      self._written, self._wrote_at = len(self._lines), time.monotonic()

  def finish(self, summary: dict) -> dict:
    """Writes the summary (with this evaluation's identity) atomically, then drops the journal;
    returns the summary as written. Write every other output of the result before this."""
    summary = {**summary, "identity": self.identity}
    files.write_json(self.summary_path, summary)
    self.path.unlink(missing_ok=True)
    self._lines = None
    return summary


# ----------------------------------------------------------------------------------------- helpers

_MISSING = "<missing>"


def _normal(obj):
  """`obj` as it reads back from JSON (tuples as lists, keys as strings)."""
  return json.loads(json.dumps(obj, default=str))


def _flat(obj, prefix: str = "") -> dict:
  if not isinstance(obj, dict) or not obj:
    return {prefix or "identity": obj}
  out = {}
  for k, v in obj.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
  return out


def _short(value) -> str:
  text = value if value is _MISSING else json.dumps(value, ensure_ascii=False)
  return text if len(text) <= 60 else text[:57] + "..."
