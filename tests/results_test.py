"""codi_jax.results: output directories checked before any work, journals that resume after the
last whole record (a torn tail dropped), identities compared field by field, complete results kept
or refused, Ctrl-C as one line and exit 130."""

from __future__ import annotations

import errno
import json
import os

import cli_util
import pytest
from etils import epath

from codi_jax import results
from codi_jax.errors import InputError

IDENTITY = {"model": {"run": "abc"}, "settings": {"max_new_tokens": 4, "k": [1, 2]}}


def _journal(out, identity=IDENTITY, **kw):
  return results.Journal(out, "set", identity, summary="set.json", total=6, **kw)


def test_check_out(tmp_path, monkeypatch):
  assert results.check_out(str(tmp_path / "new" / "dir")) == str(tmp_path / "new" / "dir")
  assert os.listdir(tmp_path / "new" / "dir") == []  # the write test leaves nothing
  afile = tmp_path / "afile"
  afile.write_text("x")
  cli_util.raises_one_line(lambda: results.check_out(str(afile)), "--out", "not a directory")
  cli_util.raises_one_line(lambda: results.check_out(str(afile / "x")), "cannot create")
  ro = "/proc/self" if os.geteuid() == 0 else str(tmp_path / "ro")  # root: mode bits do not apply
  if ro != "/proc/self":
    os.mkdir(ro, 0o500)
  cli_util.raises_one_line(lambda: results.check_out(ro, hint="pass --out=X"), ro, "pass --out=X")

  def read_only(self, *args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  monkeypatch.setattr(epath.Path, "write_text", read_only)  # access(2) said yes, the write no
  cli_util.raises_one_line(
    lambda: results.check_out(str(tmp_path)), "not writable (Read-only file system)"
  )


def test_difference_names_the_first_differing_field():
  assert results.difference(IDENTITY, json.loads(json.dumps(IDENTITY))) is None
  other = {**IDENTITY, "settings": {"max_new_tokens": 5, "k": [1, 2]}}
  assert results.difference(IDENTITY, other) == "settings.max_new_tokens: 4 there, 5 now"
  assert results.difference({"a": 1}, {"a": 1, "b": "x" * 80}).startswith(
    'b: <missing> there, "xxxx'
  )
  assert results.difference({"a": (1, 2)}, {"a": [1, 2]}) is None  # as read back from JSON


def test_journal_resumes_after_the_last_whole_record(tmp_path):
  with _journal(tmp_path) as j:
    j.append([(0, {"x": 0}), (1, {"x": 1})], seconds=2.0, compiles=1)
    j.append([(2, {"x": 2})], seconds=1.0)
  with open(tmp_path / "set.partial.jsonl", "a") as f:
    f.write('{"key": 3, "seconds": 0, "comp')  # a write cut short by a kill
  j = _journal(tmp_path)
  assert j.done == {0: {"x": 0}, 1: {"x": 1}, 2: {"x": 2}}
  assert (j.seconds, j.compiles) == (3.0, 1)
  with j:
    j.append([(3, {"x": 3})])
  lines = (tmp_path / "set.partial.jsonl").read_text().splitlines()
  assert [json.loads(x).get("key") for x in lines] == [None, 0, 1, 2, 3]  # the torn tail is gone
  summary = j.finish({"n": 4})
  assert summary == {"n": 4, "identity": IDENTITY}
  assert json.loads((tmp_path / "set.json").read_text()) == summary
  assert not (tmp_path / "set.partial.jsonl").exists()
  assert _journal(tmp_path).complete == summary  # kept by a rerun of the same evaluation


def test_other_evaluations_are_refused_unless_overwrite(tmp_path):
  with _journal(tmp_path) as j:
    j.append([(0, 1)])
  other = {**IDENTITY, "model": {"run": "def"}}
  cli_util.raises_one_line(
    lambda: _journal(tmp_path, other), "set.partial.jsonl holds partial results of another",
    'model.run: "abc" there, "def" now', "--overwrite",
  )  # fmt: skip
  j = _journal(tmp_path, other, overwrite=True)
  assert j.done == {}
  with j:
    pass
  header = json.loads((tmp_path / "set.partial.jsonl").read_text())
  assert header == {"identity": other}  # the old partial results are discarded
  j.finish({})
  cli_util.raises_one_line(
    lambda: _journal(tmp_path), "set.json holds a complete result of another evaluation",
    'model.run: "def" there, "abc" now',
  )  # fmt: skip
  (tmp_path / "set.json").write_text('{"accuracy": 1}')  # an older version's result
  cli_util.raises_one_line(lambda: _journal(tmp_path), "records no identity", "--overwrite")
  with _journal(tmp_path, overwrite=True):  # an overwrite is not complete until it finishes
    assert not (tmp_path / "set.json").exists()


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys):
  with pytest.raises(SystemExit) as info, results.exit_on_interrupt("prog"):
    with _journal(tmp_path, label="gsm8k (student)") as j:
      j.append([(0, 0), (1, 1)])
      raise KeyboardInterrupt
  assert info.value.code == 130
  assert capsys.readouterr().err == (
    f"prog: interrupted after 2 of 6 problems of gsm8k (student); partial results in {tmp_path}; "
    "rerun the same command to resume\n"
  )
  with pytest.raises(SystemExit) as info, results.exit_on_interrupt("prog"):
    raise KeyboardInterrupt  # outside any journal (loading, say)
  assert info.value.code == 130
  assert capsys.readouterr().err.count("\n") == 1
  with pytest.raises(InputError), results.exit_on_interrupt("prog"):
    raise InputError("not ours")  # other errors pass through


def test_records_in_memory_share_out_a_batch():
  r = results.Records()
  r.append([(5, "a"), (6, "b")], seconds=1.0, compiles=2)
  assert r.done == {5: "a", 6: "b"} and r.cost == {5: (0.5, 2), 6: (0.5, 0)}


def test_fingerprint_follows_the_weights_not_the_outputs_beside_them(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"w" * 8)
  (tmp_path / "config.json").write_text("{}")
  before = results.fingerprint(tmp_path)
  (tmp_path / "eval").mkdir()  # the default output directory of a checkpoint
  (tmp_path / "eval" / "gsm8k.partial.jsonl").write_text("{}\n")
  (tmp_path / "gsm8k.json").write_text("{}")  # or results written beside it (--out=<checkpoint>)
  assert results.fingerprint(tmp_path) == before
  (tmp_path / "model.safetensors").write_bytes(b"w" * 9)  # other weights
  assert results.fingerprint(tmp_path) != before
  assert results.fingerprint(tmp_path / "model.safetensors") != ""
  assert results.fingerprint("gs://bucket/model") == results.fingerprint(tmp_path / "nope") == ""
