"""Readers on local fixture files: filtering and templating, drop reports, bad-input messages."""

import json
import math
import sys
import types

import pytest

from codi_jax.data import eval_sets, formats, readers, sources
from codi_jax.errors import InputError

AUG = [
  {"question": "Q1", "cot": "<<2*3=6>> <<6+4=10>>", "answer": "10"},
  {"question": "Q2", "cot": "<<5-8=-3>>", "answer": "-3"},
  {"question": "Q3", "cot": "<<1+1=2>> <<2*2=4>>", "answer": "so #### 4"},
  {"question": "Q4", "cot": "<<1+2=3>>", "answer": None},
  {"question": "Q5", "cot": "<<500*2=1000>> <<1000*1=1000>>", "answer": "1,000"},
  {"question": "Q6", "cot": "<<1+2=3>>", "answer": "####3"},
]
NL = [
  {"question": "N1", "cot": "Tom has 3. He gets 4 more. So 7.", "answer": "7"},
  {"question": "N2", "cot": "So 5.", "answer": "5"},
  {"question": "N3", "cot": "x. y.", "answer": None},
  {"question": "N4", "cot": "a. b.", "answer": "-2"},
]


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _json(path, rows):
  path.write_text(json.dumps(rows, indent=2))
  return str(path)


def test_gsm8k_aug(tmp_path):
  records, report = readers.read_train_set("gsm8k-aug", _jsonl(tmp_path / "aug.jsonl", AUG))
  assert report["read"] == 6 and report["kept"] == 3
  assert report["dropped"] == {"null_answer": 1, "empty_answer": 0, "non_digit_answer": 2}
  assert [r["question"] for r in records] == ["Q1", "Q3", "Q5"]
  assert records[0] == {
    "question": "Q1",
    "cot": "<<2*3=6>>",
    "answer": "10",
    "steps": ["<<2*3=6>>", "<<6+4=10>>"],
    "results": [6.0, 10.0],
  }
  assert records[1]["answer"] == "4" and records[2]["answer"] == "1,000"


def test_gsm8k_aug_flags_and_json_list(tmp_path):
  path = _json(tmp_path / "aug.json", AUG)  # A JSON list reads like JSONL.
  records, report = readers.read_train_set(
    "gsm8k-aug", path, include_last_cot=True, keep_non_digit_answers=True
  )
  assert report["kept"] == 5 and report["dropped"]["null_answer"] == 1
  assert records[0]["cot"] == "<<2*3=6>> <<6+4=10>>"
  assert [r["answer"] for r in records] == ["10", "-3", "4", "1,000", "3"]
  _, report = readers.read_train_set("gsm8k-aug", path, limit=2)
  assert report["read"] == 2 and report["kept"] == 1


def test_gsm8k_aug_nl(tmp_path):
  records, report = readers.read_train_set("gsm8k-aug-nl", _jsonl(tmp_path / "nl.jsonl", NL))
  assert report["dropped"] == {"null_answer": 1, "empty_answer": 0, "non_digit_answer": 1}
  assert [r["cot"] for r in records] == ["Tom has 3. He gets 4 more.\n", ""]
  assert records[0]["steps"] == ["Tom has 3", "He gets 4 more", "So 7."]
  assert "results" not in records[0]
  records, _ = readers.read_train_set(
    "gsm8k-aug-nl", _jsonl(tmp_path / "nl.jsonl", NL), include_last_cot=True
  )
  assert records[1]["cot"] == "So 5..\n"  # The reference's join, kept as is.


def test_commonsense_and_strategy(tmp_path):
  rows = [
    {"question": "  Where? A) x B) y \n", "cot": " think hard ", "answer": "B"},
    {"question": "Q", "cot": "c", "answer": " "},
  ]
  records, report = readers.read_train_set("commonsense", _jsonl(tmp_path / "cs.jsonl", rows))
  assert records == [{"question": "Where? A) x B) y\n", "cot": "think hard\n", "answer": "B"}]
  assert report["dropped"] == {"empty_answer": 1}
  rows = [{"q": "Is it? ", "reasoning": "Yes.", "answer": True}]
  records, _ = readers.read_train_set(
    "strategy",
    _jsonl(tmp_path / "sq.jsonl", rows),
    fields={"question": "q", "cot": "reasoning"},
  )
  assert records == [{"question": "Is it?\n", "cot": "Yes.\n", "answer": "True"}]


def test_eval_sets(tmp_path):
  """The hub's field layout (eval_sets._hub_records: file lists and field overrides have no
  --sets form); a plain file reads through it."""
  gsm = [{"question": " Natalia  sold 48 clips. ", "answer": "She sold... #### 1,072"}]
  data = eval_sets.load_eval_data(_jsonl(tmp_path / "gsm.jsonl", gsm))
  assert (data.questions, data.golds) == (["Natalia sold 48 clips."], [1072.0])
  assert data.report["kept"] == 1 and data.report["gold_unparsed"] == 0
  records, report = eval_sets._hub_records("gsm8k", _jsonl(tmp_path / "gsm.jsonl", gsm))
  assert records == [{"question": "Natalia sold 48 clips.", "answer": 1072.0}]
  assert report["kept"] == 1 and report["gold_unparsed"] == 0

  train = [{"question_concat": "S1", "Answer": 3.0}, {"question_concat": "S2", "Answer": 4.0}]
  test = [{"question_concat": "S3", "Answer": "5"}]
  paths = [_json(tmp_path / "svamp_train.json", train), _jsonl(tmp_path / "svamp_test.jsonl", test)]
  records, report = eval_sets._hub_records("svamp", paths)
  assert [r["question"] for r in records] == ["S1", "S2", "S3"]
  assert [r["answer"] for r in records] == [3.0, 4.0, 5.0]
  assert report["source"].endswith("svamp_test.jsonl")

  hard = [{"instruction": "H", "response": 123456789.0}, {"instruction": "H2", "response": "x"}]
  records, report = eval_sets._hub_records("gsm-hard", _jsonl(tmp_path / "h.jsonl", hard))
  assert records[0]["answer"] == 123456789.0 and math.isinf(records[1]["answer"])
  assert report["gold_unparsed"] == 1

  arith = [{"question": "M", "final_ans": "5"}]
  records, _ = eval_sets._hub_records("multiarith", _jsonl(tmp_path / "m.jsonl", arith))
  assert records == [{"question": "M", "answer": 5.0}]

  cs = [{"question": "Which? A) a", "cot": "...", "answer": "A"}]
  records, _ = eval_sets._hub_records("commonsense", _jsonl(tmp_path / "cs.jsonl", cs))
  assert records == [{"question": "Which? A) a", "answer": "A"}]

  custom = [{"problem": "P", "solution": "7"}]
  records, _ = eval_sets._hub_records(
    "gsm8k", _jsonl(tmp_path / "c.jsonl", custom), question_field="problem", answer_field="solution"
  )
  assert records == [{"question": "P", "answer": 7.0}]


def _error(fn, *args, **kwargs) -> str:
  with pytest.raises(InputError) as e:
    fn(*args, **kwargs)
  return str(e.value)


def test_errors_name_file_line_field(tmp_path):
  good = '{"question": "Q", "cot": "c", "answer": "1"}\n'
  path = tmp_path / "bad.jsonl"
  path.write_text(good + '{"question": \n')
  assert _error(readers.read_train_set, "gsm8k-aug", str(path)).startswith(
    f"{path}: line 2: invalid JSON (Expecting value"
  )
  path.write_text(good + '\n{"question": "Q", "answer": "1"}\n')
  message = _error(readers.read_train_set, "gsm8k-aug", str(path))
  assert message == f"{path}: line 3: missing field 'cot'"
  path.write_text('{"question": 5, "cot": "c", "answer": "1"}\n')
  message = _error(readers.read_train_set, "gsm8k-aug", str(path))
  assert message == f"{path}: line 1: field 'question' must be str, got int"
  path.write_text("[1, 2]\n")
  message = _error(readers.read_train_set, "gsm8k-aug", str(path))
  assert message == f"{path}: line 1: expected a JSON object, got int"

  listed = tmp_path / "bad.json"
  rows = [{"question": "Q", "cot": "c", "answer": "1"}, {"question": "Q", "answer": "1"}]
  listed.write_text(json.dumps(rows, indent=2))  # The second object starts on line 7.
  message = _error(readers.read_train_set, "gsm8k-aug", str(listed))
  assert message == f"{listed}: line 7: missing field 'cot'"
  listed.write_text("[\n  " + good + '  {"question": }\n]')
  assert _error(readers.read_train_set, "gsm8k-aug", str(listed)).startswith(
    f"{listed}: line 3: invalid JSON"
  )
  listed.write_text("[" + good + '{"x": 1}]')
  message = _error(readers.read_train_set, "gsm8k-aug", str(listed))
  assert message == f"{listed}: line 2: invalid JSON (expected ',' or ']')"

  gsm = tmp_path / "gsm.jsonl"
  gsm.write_text('{"question": "Q", "answer": null}\n')
  message = _error(eval_sets.load_eval_data, str(gsm))
  assert message == (
    f"{gsm}: line 1: field 'answer' must be str or bool or int or float, got NoneType"
  )

  missing = str(tmp_path / "missing.jsonl")
  assert _error(readers.read_train_set, "gsm8k-aug", missing) == f"{missing}: no such file"


def test_empty_after_filtering_reports_drops(tmp_path):
  rows = [{"question": "Q", "cot": "c", "answer": a} for a in ("-1", "-2", None)]
  path = _jsonl(tmp_path / "neg.jsonl", rows)
  with pytest.raises(InputError) as e:
    readers.read_train_set("gsm8k-aug", path)
  assert str(e.value) == (
    f"{path}: no examples left after filtering (read 3; dropped: null_answer=1, "
    "empty_answer=0, non_digit_answer=2)"
  )


def test_unknown_names():
  with pytest.raises(InputError, match="unknown training set"):
    readers.read_train_set("gsm9k")
  with pytest.raises(InputError, match="unknown evaluation set"):
    eval_sets._hub_records("gsm9k")


def test_hub_without_datasets(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # Makes `import datasets` fail.
  assert _error(readers.read_train_set, "gsm8k-aug") == (
    "zen-E/GSM8k-Aug: reading from the HF hub needs the `datasets` package "
    "(pip install -e .[hub]); or pass a local file (JSON/JSONL, or `question||cot #### answer` lines)"
  )


def test_hub_with_fake_datasets(monkeypatch):
  calls = []

  def load_dataset(hub_id, config=None):
    calls.append((hub_id, config))
    if hub_id == "offline/x":
      raise ConnectionError("Couldn't reach\n the hub")
    if hub_id == "other/id":
      return {"validation": []}
    return {
      "train": [{"question_concat": "A", "Answer": 1.0}],
      "test": [{"question_concat": "B", "Answer": 2.0}, {"question_concat": "C"}],
    }

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  message = _error(eval_sets._hub_records, "svamp")
  assert message == "ChilleD/SVAMP [test]: row 2: missing field 'Answer'"
  records, report = eval_sets._hub_records("svamp", limit=2)
  assert [r["question"] for r in records] == ["A", "B"] and report["source"] == "ChilleD/SVAMP"
  message = _error(eval_sets._hub_records, "gsm8k", "other/id")
  assert message == "other/id: no split 'test' (has validation)"
  assert calls[-1] == ("other/id", "main")
  assert _error(readers.read_train_set, "gsm8k-aug", "offline/x") == (
    "offline/x: cannot load from the HF hub (ConnectionError: Couldn't reach the hub); "
    "offline? pass a local .json/.jsonl file"
  )


@pytest.mark.parametrize("name", ["folder", "folder.jsonl", "folder.json", "folder.txt"])
def test_a_directory_is_not_a_data_file(tmp_path, monkeypatch, name):
  """Never blamed on the hub: said to be a directory (a dataset folder `datasets` cannot read
  names its reason), as the training path, the validation path or an evaluation file."""
  folder = tmp_path / name
  folder.mkdir()
  monkeypatch.setitem(sys.modules, "datasets", None)
  want = f"{folder}: a directory, not a data file"
  tail = "pass a JSON/JSONL file or `question||cot #### answer` lines"
  for fn, args in (
    (sources.read_train_source, ("gsm8k-aug", str(folder))),
    (eval_sets._hub_records, ("svamp", str(folder))),
  ):
    message = _error(fn, *args)
    assert message.startswith(want) and message.endswith(tail), message
  message = _error(eval_sets.load_eval_data, "gsm8k", paths={"gsm8k": str(folder)})
  assert message.startswith(want) and "evaluation set gsm8k" in message, message

  def load_dataset(hub_id, config=None):
    raise ValueError(f"Unable to find data files in {hub_id}")

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  if not name.endswith((".json", ".jsonl", ".txt")):  # only a folder named like none goes there
    assert _error(sources.read_train_source, "gsm8k-aug", str(folder)) == (
      f"{want} `datasets.load_dataset` can read (ValueError: Unable to find data files in "
      f"{folder}); {tail}"
    )


# ---------------------------------------------------------------------------------------------
# Native file formats (formats.py) and a run's sources (sources.py), on small tmp files.


def _gsm8k_row(question="Q", answer="a <<1+2=3>>3 b <<3*2=6>>6\n#### 6"):
  return {"question": question, "answer": answer}


def test_gsm8k_bad_rows_are_counted_and_named(tmp_path):
  rows = [
    _gsm8k_row(),
    _gsm8k_row(answer="no marker here"),
    _gsm8k_row(question="  "),
    _gsm8k_row(answer="x\n#### about 5"),
    {"question": "Q"},
    _gsm8k_row(question=7),
    _gsm8k_row(answer="<<2-5=-3>>-3\n#### -3"),
    _gsm8k_row(answer="<<500*2=1000>>\n#### 1,000"),
  ]
  path = _jsonl(tmp_path / "gsm8k.jsonl", rows)
  records, report = sources.read_train_file("gsm8k-aug", path)
  assert [r["answer"] for r in records] == ["6", "1000"]
  assert records[0]["cot"] == "<<1+2=3>>" and records[0]["results"] == [3.0, 6.0]
  assert (report["read"], report["kept"]) == (8, 2)
  assert report["dropped"] == {
    "missing_field": 1,
    "not_text": 1,
    "empty_question": 1,
    "no_####": 1,
    "no_||": 0,
    "bad_answer": 1,
    "null_answer": 0,
    "empty_answer": 0,
    "non_digit_answer": 1,
  }
  assert report["bad_rows"] == [
    f"{path}: line 2: no '####' in field 'answer'",
    f"{path}: line 3: empty question",
    f"{path}: line 4: answer 'about 5' after '####' is not a number",
    f"{path}: line 5: missing field 'answer'",
    f"{path}: line 6: field 'question' is int, not text",
  ]
  records, _ = sources.read_train_file("gsm8k-aug-nl", path)
  assert records[0]["cot"] == ""  # One sentence: nothing is left after dropping the last.
  assert records[0]["steps"] == ["a 3 b 6."]
  two_lines = "x = <<1+1=2>>2 apples\n\nSo 2*3 = <<2*3=6>>6!\n"
  assert formats.nl_cot(two_lines) == "x = 2 apples. So 2*3 = 6!"
  assert formats.aug_cot(two_lines) == "<<1+1=2>> <<2*3=6>>"

  bad = _jsonl(tmp_path / "bad.jsonl", rows[1:3])
  message = _error(sources.read_train_file, "gsm8k-aug", bad)
  assert message == (
    f"{bad}: no readable rows (read 2, kept 0, dropped: empty_question=1, no_####=1; "
    f"first: {bad}: line 1: no '####' in field 'answer')"
  )


def test_pipe_bad_rows(tmp_path):
  path = tmp_path / "aug.txt"
  lines = ["Q1||<<1+1=2>> <<2*3=6>> #### 6", "", "no separator #### 3", "||<<1+1=2>> #### 2"]
  lines += ["Q4||<<1+1=2>> 2", "Q5||<<1+1=2>> ####  ", "Q6||#### -4"]
  path.write_text("\n".join(lines) + "\n")
  records, report = sources.read_train_file("gsm8k-aug", path)
  assert records == [
    {
      "question": "Q1",
      "cot": "<<1+1=2>>",
      "answer": "6",
      "steps": ["<<1+1=2>>", "<<2*3=6>>"],
      "results": [2.0, 6.0],
    }
  ]
  assert (report["read"], report["kept"], report["empty_cot"]) == (6, 1, 1)
  dropped = {k: v for k, v in report["dropped"].items() if v}
  assert dropped == {
    "no_||": 1,
    "empty_question": 1,
    "no_####": 1,
    "bad_answer": 1,
    "non_digit_answer": 1,
  }
  assert report["bad_rows"][0] == f"{path}: line 3: no '||' between question and reasoning"
  message = _error(sources.read_train_file, "gsm8k-aug-nl", path)
  assert message.startswith(f"{path}: `||` lines hold calculator steps only")
  message = _error(sources.read_train_file, "commonsense", path)
  assert message.startswith(f"{path}: a pipe file holds math problems")


def test_detect_layout(tmp_path):
  assert sources.detect_layout(tmp_path / "x.txt") == "pipe"  # By extension, before reading.
  assert sources.detect_layout(_jsonl(tmp_path / "a.jsonl", AUG)) == "hub"
  assert sources.detect_layout(_json(tmp_path / "a.json", AUG)) == "hub"
  assert sources.detect_layout(_jsonl(tmp_path / "g.jsonl", [_gsm8k_row()])) == "gsm8k"
  assert sources.detect_layout(_json(tmp_path / "g.json", [_gsm8k_row()])) == "gsm8k"
  pipe = tmp_path / "p.data"
  pipe.write_text("\nQ||<<1+1=2>> #### 2\n")
  assert sources.detect_layout(pipe) == "pipe"
  pipe.write_text("\n\nplain text\n")
  assert _error(sources.detect_layout, pipe).startswith(f"{pipe}: line 3: unknown layout")
  missing = tmp_path / "none.jsonl"
  assert _error(sources.detect_layout, missing) == f"{missing}: no such file"


def test_eval_bad_rows(tmp_path):
  svamp = [
    {"Body": "A has 3.", "Question": " How  many?", "Answer": 3.0},
    {"Body": "B", "Question": "C", "Answer": "n/a"},
    {"Body": "", "Question": " ", "Answer": 1.0},
    {"Body": "D", "Answer": 2.0},
    {"Body": "E", "Question": "F", "Answer": True},
  ]
  path = _json(tmp_path / "SVAMP.json", svamp)
  data = eval_sets.load_eval_data("svamp", paths={"svamp": path})
  questions, golds, report = data.questions, data.golds, data.report
  assert questions == ["A has 3. How many?"] and golds == [3.0]
  assert (report["read"], report["kept"], report["used"]) == (5, 1, 1)
  assert {k: v for k, v in report["dropped"].items() if v} == {
    "bad_answer": 2,
    "empty_question": 1,
    "missing_field": 1,
  }
  assert report["bad_rows"][0] == f"{path}: line 7: answer 'n/a' is not a number"

  hard = [{"input": "H", "target": 1e13 + 0.5}, {"input": "H2", "target": "7"}, {"input": "x"}]
  path = _jsonl(tmp_path / "gsmhardv2.jsonl", hard)
  data = eval_sets.load_eval_data("gsm-hard", paths={"gsm_hard": path})
  golds, report = data.golds, data.report
  assert golds == [1e13 + 0.5, 7.0] and report["dropped"]["missing_field"] == 1
  gsm = [{"question": "G", "answer": "#### 1,024"}, {"question": "G2", "answer": "7"}]
  path = _jsonl(tmp_path / "test.jsonl", gsm)
  data = eval_sets.load_eval_data("gsm8k", paths={"gsm8k": path})
  golds, report = data.golds, data.report
  assert golds == [1024.0] and report["bad_rows"] == [
    f"{path}: line 2: no '####' in field 'answer'"
  ]

  assert _error(eval_sets.load_eval_data, "gsm9k") == (
    "--sets=gsm9k: not a .json/.jsonl file, and not one of test, valid, synthetic:valid, "
    "synthetic:test, gsm8k, svamp, gsm_hard, multiarith, gsm8k_aug_test, commonsense"
  )
  assert _error(eval_sets.load_eval_data, "svamp", paths={"svamp": ""}) == (
    "svamp: pass a data_dir holding svamp/SVAMP.json, or the file's path"
  )
  message = _error(eval_sets.load_eval_data, "multiarith", data_dir=str(tmp_path))
  assert message == (
    f"{tmp_path}/multiarith/mawpsmultiarith.jsonl: no such file (evaluation set multiarith, "
    "expected layout multiarith/mawpsmultiarith.jsonl)"
  )
  path = _jsonl(tmp_path / "m.jsonl", [{"input": "M", "target": None}])
  assert _error(eval_sets.load_eval_data, "multiarith", paths={"multiarith": path}).startswith(
    f"{path}: no usable rows for multiarith (read 1, kept 0, dropped: missing_field=1; first: "
  )


def _config(**data):
  from configs import base

  c = base.get_config()
  c.data.update(data)
  return c


def test_load_records_from_files(tmp_path):
  train = [_gsm8k_row(f"Q{i}", f"<<{i}+1={i + 1}>>\n#### {i + 1}") for i in range(30)]
  path = _jsonl(tmp_path / "train.jsonl", train)
  valid = tmp_path / "valid.txt"
  valid.write_text("Q3||<<3+1=4>> #### 4\nV||<<1+1=2>> <<2+2=4>> #### 4\n")
  c = _config(source="gsm8k-aug", path=path)
  train_recs, valid_recs, reports = sources.load_records(c)
  assert len(train_recs) + len(valid_recs) == 30 and len(valid_recs) == 3  # Seeded hold-out.
  assert reports["valid"] == {"source": "hold-out of train", "kept": 3}
  assert sources.load_records(c)[1] == valid_recs
  c.data.valid_path = str(valid)
  train_recs, valid_recs, reports = sources.load_records(c)
  assert len(train_recs) == 30 and [r["question"] for r in valid_recs] == ["Q3", "V"]
  assert reports["valid"]["overlap_with_train"] == 1
  assert reports["train"]["format"] == "gsm8k-jsonl"
  c = _config(source="gsm8k-aug", path=path, format="parquet")
  assert _error(sources.load_records, c).startswith("--config.data.format: unknown format")
  records, _, _ = sources.load_records(_config(source="synthetic"))
  assert records and "results" in records[0]


def test_load_records_hub_and_missing_tfds(monkeypatch):
  rows = [{"question": f"Q{i}", "cot": "<<1+1=2>> <<2+2=4>>", "answer": "4"} for i in range(20)]
  calls = []

  def load_dataset(hub_id, config=None):
    calls.append(hub_id)
    return {"train": rows}

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  train, valid, reports = sources.load_records(_config(source="gsm8k-aug", path="other/aug"))
  assert (len(train), len(valid), reports["train"]["source"]) == (18, 2, "other/aug")
  sources.load_records(_config(source="gsm8k-aug", valid_path="other/valid"))
  assert calls == ["other/aug", "zen-E/GSM8k-Aug", "other/valid"]

  monkeypatch.setitem(sys.modules, "datasets", None)
  message = _error(sources.load_records, _config(source="gsm8k-aug"))
  assert message.startswith("zen-E/GSM8k-Aug: reading from the HF hub needs the `datasets`")
  assert "pip install -e .[hub]" in message

  import codi_jax.data

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  monkeypatch.delitem(sys.modules, "codi_jax.data.tfds_gsm8k_aug", raising=False)
  monkeypatch.delattr(codi_jax.data, "tfds_gsm8k_aug", raising=False)
  c = _config(source="gsm8k-aug", format="tfds", tfds_data_dir="/nowhere")
  assert _error(sources.load_records, c) == (
    "--config.data.format=tfds needs tensorflow-datasets: pip install -r requirements-tfds.txt"
  )
