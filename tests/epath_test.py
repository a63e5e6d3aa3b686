"""Workdirs through etils.epath: a tiny run, its resume and its evaluation on a workdir given as an
epath.Path with every os/open call on it forbidden in our modules; and the object-store code paths
(lock object, metrics rewritten whole, final/ in place, run.json last) on gs:// served by a fake
epath backend over a local folder, with the same ban."""
# pylint: disable=protected-access

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import time
import types

import cli_util
import numpy as np
import pytest
import tiny_codi
from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath
from flax import nnx

from codi_jax import checkpoint, eval_lib, eval_runner, files, final, metrics, results, train_lib
from codi_jax import workdir as wd
from codi_jax.codi import build
from codi_jax.data import sources

_OS = backend_lib.os_backend
RUN = "gs://bucket/run"

# ------------------------------------------------------------------------------ no os/open bypass

_PURE = {
  os: {"fspath", "getpid", "getppid", "strerror", "fsencode", "fsdecode"},
  os.path: {"join", "abspath", "dirname", "basename", "normpath", "split", "splitext", "isabs"},
}


class _Guarded:
  """A stand-in for `os`, `os.path` or `shutil` in one module: calls touching `prefixes` fail."""

  def __init__(self, module, prefixes, seen):
    self._module, self._prefixes, self._seen = module, prefixes, seen

  def __getattr__(self, name):
    value = getattr(self._module, name)
    if self._module is os and name == "path":
      return _Guarded(os.path, self._prefixes, self._seen)
    if not callable(value) or isinstance(value, type) or name in _PURE.get(self._module, ()):
      return value

    def guarded(*args, **kwargs):
      _check(f"{self._module.__name__}.{name}", args, kwargs, self._prefixes, self._seen)
      return value(*args, **kwargs)

    return guarded


def _check(what, args, kwargs, prefixes, seen):
  for a in (*args, *kwargs.values()):
    if isinstance(a, str | os.PathLike) and os.fspath(a).startswith(prefixes):
      seen.append(f"{what}({os.fspath(a)})")
      raise AssertionError(f"{what} on {os.fspath(a)} bypasses etils.epath")


def forbid_os(monkeypatch, modules, *prefixes) -> list[str]:
  """Replaces os, shutil and open in `modules` by stand-ins refusing paths under `prefixes`;
  returns the list of refused calls (checked at the end: a broad except may swallow the error)."""
  seen: list[str] = []
  for m in modules:
    monkeypatch.setattr(m, "os", _Guarded(os, prefixes, seen), raising=False)
    if hasattr(m, "shutil"):
      monkeypatch.setattr(m, "shutil", _Guarded(shutil, prefixes, seen))

    def guarded_open(file, *args, **kwargs):
      _check("open", (file,), {}, prefixes, seen)
      return open(file, *args, **kwargs)  # noqa: SIM115

    monkeypatch.setattr(m, "open", guarded_open, raising=False)
  return seen


# ------------------------------------------------------------------------------ a fake object store


class FakeGcs(backend_lib.Backend):
  """gs://<path> served from `<root>/<path>` with an object store's limits: no append, no parent
  directories needed. Records every object written."""

  def __init__(self, root):
    self.root, self.writes = str(root), []

  def local(self, path) -> str:
    path = os.fspath(path)
    assert path.startswith("gs://"), path
    return os.path.join(self.root, path[len("gs://") :])

  def open(self, path, mode):
    if "a" in mode or "+" in mode:
      raise NotImplementedError(f"{path}: objects cannot be appended to")
    if "w" in mode:
      self.writes.append(os.fspath(path))
      os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
    return _OS.open(self.local(path), mode)

  def exists(self, path):
    return _OS.exists(self.local(path))

  def isdir(self, path):
    return _OS.isdir(self.local(path))

  def listdir(self, path):
    return _OS.listdir(self.local(path))

  def glob(self, path):
    return ["gs://" + os.path.relpath(p, self.root) for p in _OS.glob(self.local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    raise NotImplementedError

  def makedirs(self, path, *, exist_ok=False, mode=None):
    _OS.makedirs(self.local(path), exist_ok=exist_ok)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    _OS.mkdir(self.local(path), exist_ok=exist_ok)

  def rmtree(self, path):
    _OS.rmtree(self.local(path))

  def remove(self, path):
    _OS.remove(self.local(path))

  def rename(self, path, dst):
    _OS.rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    _OS.replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite):
    _OS.copy(self.local(path), self.local(dst), overwrite=overwrite)

  def stat(self, path):
    return _OS.stat(self.local(path))


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """gs:// through epath to a local folder; os/open on gs:// paths banned in our modules; run from
  an empty directory that must stay empty (os.makedirs("gs://b/x") would create ./gs:/b/x)."""
  fake = FakeGcs(tmp_path / "gcs")
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(wd, "_SETTLE_S", 0.0)
  fake.bypasses = forbid_os(
    monkeypatch,
    (wd, files, metrics, final, checkpoint, train_lib, eval_lib, eval_runner, results),
    "gs:",
    fake.root,
  )
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield fake
  assert not fake.bypasses
  assert not os.listdir(cwd)


# ------------------------------------------------------------------ object stores: the lock object


def test_lock_object_on_gs(gcs):
  assert wd.check_workdir(RUN + "/") == RUN
  with wd.WorkdirLock(RUN) as lock:
    assert lock.path == RUN + "/.lock" and gcs.writes == [RUN + "/.lock"]
    assert wd.read_holder(RUN) == lock.holder
    assert os.path.isfile(gcs.local(RUN + "/.lock"))
    cli_util.raises_one_line(
      lambda: wd.WorkdirLock(RUN).acquire(), "in use by this process", "/.lock"
    )
  assert not os.path.exists(gcs.local(RUN + "/.lock"))
  assert wd.read_holder(RUN) is None


def test_lock_object_stale_other_host_and_replaced(gcs, caplog):
  lock = epath.Path(RUN) / ".lock"
  dead = dataclasses.replace(wd._me(), pid=999_999_999)
  lock.write_text(json.dumps(dataclasses.asdict(dead)))
  with caplog.at_level(logging.WARNING), wd.WorkdirLock(RUN):
    assert wd.read_holder(RUN).pid == os.getpid()
  assert "pid 999999999 no longer exists" in caplog.text

  other = dataclasses.replace(dead, host="elsewhere.example")
  lock.write_text(json.dumps(dataclasses.asdict(other)))
  cli_util.raises_one_line(
    lambda: wd.WorkdirLock(RUN).acquire(), "another run", "elsewhere.example"
  )
  assert wd.read_holder(RUN) == other  # untouched

  lock.unlink()
  held = wd.WorkdirLock(RUN).acquire()
  lock.write_text(json.dumps(dataclasses.asdict(other)))  # someone replaced it meanwhile
  with caplog.at_level(logging.WARNING):
    held.release()
  assert wd.read_holder(RUN) == other and "removed or replaced" in caplog.text


def test_lock_object_race_the_later_writer_wins(gcs, monkeypatch):
  """Both runs saw no lock; the rival's record lands while we settle: we are refused, it holds."""
  me = wd._me()
  rival = dataclasses.replace(me, pid=os.getppid(), proc_start=None, token="rival")  # alive, here

  def rival_writes(_):
    (epath.Path(RUN) / ".lock").write_text(json.dumps(dataclasses.asdict(rival)))

  monkeypatch.setattr(wd, "time", types.SimpleNamespace(sleep=rival_writes, time=time.time))
  cli_util.raises_one_line(
    lambda: wd.WorkdirLock(RUN).acquire(), "in use by another run", os.getppid()
  )
  assert wd.read_holder(RUN) == rival


def test_object_store_errors_are_one_line(gcs, monkeypatch):
  cli_util.raises_one_line(
    lambda: wd.check_workdir("nosuch://bucket/run"), "unsupported URL scheme"
  )
  (epath.Path("gs://bucket") / "afile").write_text("x")
  cli_util.raises_one_line(lambda: wd.check_workdir("gs://bucket/afile"), "not a directory")

  def denied(path, mode):
    raise PermissionError(403, "caller does not have storage.objects.create access")

  monkeypatch.setattr(gcs, "open", denied)
  cli_util.raises_one_line(
    lambda: wd.WorkdirLock(RUN).acquire(), "cannot", "PermissionError", "403"
  )


# ---------------------------------------------------- object stores: metrics, files, final/, resume


def test_metrics_and_json_on_gs_are_whole_object_writes(gcs, monkeypatch):
  monkeypatch.setattr(metrics, "_FLUSH_S", 1e9)
  w = metrics.MetricWriter(RUN, tensorboard=False)
  for step in (1, 2, 3):
    w.write_scalars(step, {"loss": np.float32(step), "per_layer": np.arange(2.0)})
  assert not any(p.endswith("metrics.jsonl") for p in gcs.writes)  # buffered: ~1 write/s/object
  w.close()
  w = metrics.MetricWriter(RUN, tensorboard=False)  # a resumed run keeps the earlier lines
  w.write_scalars(4, {"loss": 4.0})
  w.close()
  path = epath.Path(RUN) / metrics.JSONL
  rows = [json.loads(x) for x in path.read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[0]["per_layer/1"] == 1.0
  metrics.truncate(RUN, 2)
  assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
  files.write_json(RUN + "/eval/x.json", {"a": 1})
  assert json.loads((epath.Path(RUN) / "eval" / "x.json").read_text()) == {"a": 1}
  assert not any(".tmp" in p for p in gcs.writes)  # no temporary object, no rename (a copy)


def test_evaluation_journal_on_gs_resumes_without_appending(gcs, monkeypatch):
  """Objects cannot be appended to: the journal is rewritten whole (at most every
  `_OBJECT_WRITE_S` and when the run stops), a rerun resumes from it, and the summary lands last."""
  out = RUN + "/eval"
  assert results.check_out(out + "/") == out
  ident = {"model": {"run": "abc"}}

  def journal(identity=ident):
    return results.Journal(out, "set", identity, summary="set.json", total=4)

  monkeypatch.setattr(results, "_OBJECT_WRITE_S", 1e9)
  with journal() as j:
    j.append([(0, "a")])
    j.append([(1, "b")])  # buffered: the object is rewritten when the run stops
    assert [p for p in gcs.writes if p.endswith("partial.jsonl")] == [out + "/set.partial.jsonl"]
  j = journal()
  assert j.done == {0: "a", 1: "b"}
  cli_util.raises_one_line(
    lambda: journal({"model": {"run": "def"}}), "partial results of another evaluation"
  )
  with j:
    j.append([(2, "c"), (3, "d")])
  j.finish({"n": 4})
  assert json.loads((epath.Path(out) / "set.json").read_text())["identity"] == ident
  assert not (epath.Path(out) / "set.partial.jsonl").exists()
  assert gcs.writes[-1] == out + "/set.json" and not any(".tmp" in p for p in gcs.writes)


class _NpzCheckpointer:
  """Orbax's StandardCheckpointer for the fake bucket (TensorStore would call the real GCS): the
  tree as one .npz object through epath."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass

  def save(self, path, tree):
    flat = nnx.traversals.flatten_mapping(tree)
    buf = io.BytesIO()
    np.savez(buf, **{"|".join(map(str, k)): np.asarray(v) for k, v in flat.items()})
    (epath.Path(path) / "tree.npz").write_bytes(buf.getvalue())

  def restore(self, path, target):
    data = np.load(io.BytesIO((epath.Path(path) / "tree.npz").read_bytes()))
    flat = nnx.traversals.flatten_mapping(target)
    return nnx.traversals.unflatten_mapping({k: data["|".join(map(str, k))] for k in flat})


def test_final_on_gs_is_written_in_place_run_json_last(gcs, monkeypatch):
  monkeypatch.setattr(final.ocp, "StandardCheckpointer", _NpzCheckpointer)
  c = tiny_codi.get_config()
  recs, _, _ = sources.load_records(c)
  codi, tok, special = build.build_model(c, build.build_tokenizer(c, recs))
  params = nnx.state(codi, nnx.Param)
  with wd.claim(RUN) as path:
    assert path == RUN
    assert train_lib._prepare_workdir(path, c) == RUN + "/checkpoints"
    assert final.save_final(path, params, c, tok, special, {"steps": 0}) == RUN + "/final"
  written = [p for p in gcs.writes if "/final" in p]
  assert written[-1] == RUN + "/final/run.json" and not any("final.tmp" in p for p in written)
  loaded = final.load_final(RUN)
  assert loaded.special == special and loaded.path == RUN + "/final"
  a = dict(nnx.to_flat_state(params))
  b = dict(nnx.to_flat_state(nnx.state(loaded.codi, nnx.Param)))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k].get_value()), np.asarray(b[k].get_value()))
  cli_util.raises_one_line(
    lambda: train_lib._prepare_workdir(RUN, c), "already holds a finished run"
  )

  (epath.Path(RUN) / "final" / "run.json").unlink()  # a save interrupted before its last write
  cli_util.raises_one_line(lambda: final.read_final(RUN), "incomplete checkpoint (no run.json)")
  for step in (2, 4):
    (epath.Path(RUN) / "checkpoints" / str(step)).mkdir(parents=True)
  c.resume = False
  cli_util.raises_one_line(
    lambda: train_lib._prepare_workdir(RUN, c), "holds checkpoints (steps 2..4)"
  )
  c.overwrite = True
  train_lib._prepare_workdir(RUN, c)  # accepted, and nothing moves before the set-up succeeded
  assert (epath.Path(RUN) / "checkpoints" / "4").exists()
  moved = train_lib.move_previous_run(RUN)  # then the previous run goes aside, kept
  assert moved.startswith(RUN + "/previous-") and not (epath.Path(RUN) / "checkpoints").exists()
  assert sorted(p.name for p in epath.Path(moved).iterdir()) == ["checkpoints", "final"]
  assert (epath.Path(moved) / "checkpoints" / "4").exists()


def test_export_from_a_run_on_gs(gcs, monkeypatch, tmp_path):
  from codi_jax import export  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(final.ocp, "StandardCheckpointer", _NpzCheckpointer)
  c = tiny_codi.get_config()
  recs, _, _ = sources.load_records(c)
  codi, tok, special = build.build_model(c, build.build_tokenizer(c, recs))
  with wd.claim(RUN) as path:
    final.save_final(path, nnx.state(codi, nnx.Param), c, tok, special, {"steps": 0})
  out = tmp_path / "exported"
  export.export(RUN, str(out))
  settings = json.loads((out / "codi" / "codi_config.json").read_text())
  assert settings["workdir"] == RUN  # not <cwd>/gs:/bucket/run


# ------------------------------------------------------- a local run through the same epath code


def test_tiny_run_resume_and_evaluate_on_an_epath_workdir(tmp_path, monkeypatch):
  """Train (preempted at step 2), resume to the end, evaluate: the workdir is an epath.Path and no
  module of ours touches it with os, shutil or open (the lock keeps its local link/O_EXCL file,
  so workdir.py is not in the ban here; its object-store path is, above)."""
  run = epath.Path(tmp_path) / "run"
  bypasses = forbid_os(
    monkeypatch,
    (files, metrics, final, checkpoint, train_lib, eval_lib, eval_runner, results),
    str(run),
  )
  c = tiny_codi.get_config()
  c.optim.num_steps, c.eval.every_steps, c.checkpoint.every_steps = 4, 4, 2
  c.data.synthetic.test = 8
  monkeypatch.setattr(checkpoint.Preemption, "reached", lambda self, step: step == 2)
  first = train_lib.train_and_evaluate(c, run)
  assert first["preempted"] and first["stopped_at"] == 2
  assert first["checkpoint"] == f"{run}/checkpoints/2" and not (run / "final").exists()

  monkeypatch.setattr(checkpoint.Preemption, "reached", lambda self, step: False)
  second = train_lib.train_and_evaluate(c, run)
  assert second["resumed_from"] == 2 and second["final"] == f"{run}/final"
  rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  assert json.loads((run / "final" / "run.json").read_text())["resumed_from"] == 2

  out = eval_lib.evaluate(eval_lib.Options(workdir=str(run), limit=4, batch_size=4, progress=False))
  summary = json.loads((run / "eval" / "synthetic_test.json").read_text())
  assert summary["n"] == 4 and summary == json.loads(json.dumps(out["results"][0]))
  assert summary["workdir"] == str(run)
  assert not bypasses
  assert not any(p.name.startswith(".tmp_") for p in (run / "eval").iterdir())
