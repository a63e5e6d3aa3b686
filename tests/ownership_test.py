"""Delete only what you own: `codi_jax.export` and `--config.overwrite=True` never remove a path
they did not create (unrelated files stay byte-identical), a training overwrite changes nothing
before its whole set-up succeeded, and a refused start leaves no directory behind."""
# pylint: disable=protected-access

import hashlib
import json
import os

import cli_util
import pytest
import tiny_codi

from codi_jax import export, train_lib
from codi_jax.errors import InputError
from codi_jax.models import memory, weights_io


def tree(root) -> dict:
  """Everything under `root`: relative path -> "dir" or the sha256 of the file's bytes."""
  out = {}
  for path, dirs, files in os.walk(root):
    for d in dirs:
      out[os.path.relpath(os.path.join(path, d), root)] = "dir"
    for f in files:
      with open(os.path.join(path, f), "rb") as fh:
        out[os.path.relpath(os.path.join(path, f), root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def unrelated(folder) -> dict:
  """A folder of someone else's files (nested, one of them named like an export's file)."""
  (folder / "sub").mkdir(parents=True)
  (folder / "notes.txt").write_text("mine")
  (folder / "config.json").write_text('{"not": "an export"}')
  (folder / "sub" / "data.bin").write_bytes(bytes(range(256)))
  return tree(folder)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> str:
  return tiny_codi.write_finished(tmp_path_factory.mktemp("finished") / "run")


# ------------------------------------------------------------------------------------- export


def test_export_leaves_a_folder_named_like_its_temporary_one(finished, tmp_path):
  """`--out=X` while `X.tmp` exists (someone else's): X.tmp is untouched, no temporary is left."""
  before = unrelated(tmp_path / "hf.tmp")
  export.export(finished, str(tmp_path / "hf"))
  assert tree(tmp_path / "hf.tmp") == before
  assert sorted(os.listdir(tmp_path)) == ["hf", "hf.tmp"]
  assert os.path.isfile(tmp_path / "hf" / export.MARKER)


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_refuses_an_unrelated_folder(finished, tmp_path, overwrite):
  """`--overwrite --out=<an unrelated folder>`: one line, the folder byte-identical."""
  before = unrelated(tmp_path / "theirs")
  cli_util.raises_one_line(
    lambda: export.export(finished, str(tmp_path / "theirs"), overwrite=overwrite),
    "is not an export",
    export.MARKER,
    "choose another --out",
  )
  assert tree(tmp_path / "theirs") == before
  assert os.listdir(tmp_path) == ["theirs"]


def test_overwrite_replaces_a_previous_export_and_nothing_beside_it(finished, tmp_path):
  out = tmp_path / "hf"
  export.export(finished, str(out))
  first = tree(out)
  cli_util.raises_one_line(lambda: export.export(finished, str(out)), "a previous export")
  assert tree(out) == first
  neighbour = unrelated(tmp_path / "neighbour")
  (out / "stale.txt").write_text("from the previous export")
  export.export(finished, str(out), overwrite=True)
  assert not (out / "stale.txt").exists() and os.path.isfile(out / "codi" / "model.safetensors")
  assert json.loads((out / export.MARKER).read_text())["written_by"] == export.PROG
  assert tree(tmp_path / "neighbour") == neighbour
  assert sorted(os.listdir(tmp_path)) == ["hf", "neighbour"]  # no temporary or old copy left


def test_failed_export_removes_only_what_it_created(finished, tmp_path, monkeypatch):
  """A write failing midway: the export's own temporary folder and the parents it created go;
  a previous export and its neighbours stay."""
  out = tmp_path / "hf"
  export.export(finished, str(out))
  before = tree(tmp_path)

  def full_disk(path, tensors):
    raise OSError(28, "No space left on device", path)

  monkeypatch.setattr(weights_io, "write_safetensors", full_disk)
  with pytest.raises(OSError, match="No space left"):
    export.export(finished, str(out), overwrite=True)
  with pytest.raises(OSError, match="No space left"):
    export.export(finished, str(tmp_path / "new" / "deeper" / "hf"))
  assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------ training


def _old_run(workdir) -> dict:
  """A previous run's artefacts (as files: nothing reads them before the move) and a user file."""
  for rel, text in {
    "checkpoints/4/meta/metadata": "{}",
    "checkpoints/4/_CHECKPOINT_METADATA": "{}",
    "metrics.jsonl": '{"step": 1, "loss": 2.0}\n',
    "tb/events.out.tfevents.1": "events",
    "final/run.json": '{"steps": 4}',
    "eval/test.json": "{}",
    "notes.txt": "the user's",
  }.items():
    (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
    (workdir / rel).write_text(text)
  return tree(workdir)


def _malformed(path) -> str:
  row = {"question": "1+1?", "cot": "<<1+1=2>>", "answer": "2"}
  path.write_text("\n".join([json.dumps(row)] * 3 + ['{"question": "broken'] + [json.dumps(row)]))
  return str(path)


def test_overwrite_with_a_malformed_data_file_changes_nothing(tmp_path):
  """Validated before anything moves: the old checkpoints, metrics and final/ are byte-identical."""
  work = tmp_path / "run"
  before = _old_run(work)
  c = tiny_codi.get_config()
  c.data.source, c.data.path = "gsm8k-aug", _malformed(tmp_path / "bad.jsonl")
  c.overwrite = True
  cli_util.raises_one_line(
    lambda: train_lib.train_and_evaluate(c, str(work)), "bad.jsonl: line 4: invalid JSON"
  )
  assert tree(work) == before


def test_overwrite_moves_the_previous_run_aside_after_the_set_up(tmp_path, capsys):
  work = tmp_path / "run"
  before = _old_run(work)
  c = tiny_codi.get_config()
  c.optim.num_steps, c.eval.num_examples, c.overwrite = 2, 4, True
  train_lib.train_and_evaluate(c, str(work))
  (previous,) = [d for d in os.listdir(work) if d.startswith("previous-")]
  moved = {k: v for k, v in before.items() if k != "notes.txt"}
  assert tree(work / previous) == moved  # every artefact, byte-identical
  assert (work / "notes.txt").read_text() == "the user's"
  assert json.loads((work / "final" / "run.json").read_text())["steps"] == 2
  steps = [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()]
  assert steps and steps[0] == 1  # the new run's metrics only
  assert f"moved the previous run (checkpoints, eval, final, metrics.jsonl, tb) to {work}" in (
    capsys.readouterr().out
  )


def test_move_previous_run_never_reuses_a_folder(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("a")
  first = train_lib.move_previous_run(str(tmp_path))
  (tmp_path / "metrics.jsonl").write_text("b")
  second = train_lib.move_previous_run(str(tmp_path))
  assert first != second and train_lib.move_previous_run(str(tmp_path)) is None
  assert [open(os.path.join(d, "metrics.jsonl")).read() for d in (first, second)] == ["a", "b"]


@pytest.mark.parametrize("cause", ["data", "memory"])
def test_a_refused_start_leaves_no_directory_behind(tmp_path, monkeypatch, cause):
  """Refused while reading the data, or at the first step's memory check (after checkpoints/ was
  created): the workdir and the parents created for it are gone; the listing is as before."""
  c = tiny_codi.get_config()
  if cause == "data":
    c.data.source, c.data.path = "gsm8k-aug", _malformed(tmp_path / "bad.jsonl")
  else:
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1 << 10)
  before = tree(tmp_path)
  with pytest.raises(InputError):
    train_lib.train_and_evaluate(c, str(tmp_path / "a" / "b" / "run"))
  assert tree(tmp_path) == before


def test_a_refused_start_keeps_an_existing_workdir_and_its_files(tmp_path):
  work = tmp_path / "run"
  work.mkdir()
  (work / "notes.txt").write_text("mine")
  c = tiny_codi.get_config()
  c.data.source, c.data.path = "gsm8k-aug", _malformed(tmp_path / "bad.jsonl")
  with pytest.raises(InputError):
    train_lib.train_and_evaluate(c, str(work))
  assert os.listdir(work) == ["notes.txt"]


def test_num_steps_zero_says_the_epochs_it_means(tmp_path, monkeypatch, capsys):
  c = tiny_codi.get_config()
  c.optim.num_steps, c.optim.epochs = 0, 2.0
  monkeypatch.setattr(train_lib.Trainer, "run", lambda self: {"steps": self.num_steps})
  steps = train_lib.train_and_evaluate(c, str(tmp_path))["steps"]
  assert steps > 2
  assert (
    f"steps: optim.num_steps=0, so optim.epochs=2 epochs = {steps:,} steps; set "
    "--config.optim.num_steps for a fixed count"
  ) in capsys.readouterr().out
