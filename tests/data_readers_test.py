"""Readers on local fixture files: filtering and templating, drop reports, bad-input messages."""

import json
import math
import sys
import types

import pytest

from codi_jax.data import readers
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
  gsm = [{"question": " Natalia  sold 48 clips. ", "answer": "She sold... #### 1,072"}]
  records, report = readers.read_eval_set("gsm8k", _jsonl(tmp_path / "gsm.jsonl", gsm))
  assert records == [{"question": "Natalia sold 48 clips.", "answer": 1072.0}]
  assert report["kept"] == 1 and report["gold_unparsed"] == 0

  train = [{"question_concat": "S1", "Answer": 3.0}, {"question_concat": "S2", "Answer": 4.0}]
  test = [{"question_concat": "S3", "Answer": "5"}]
  paths = [_json(tmp_path / "svamp_train.json", train), _jsonl(tmp_path / "svamp_test.jsonl", test)]
  records, report = readers.read_eval_set("svamp", paths)
  assert [r["question"] for r in records] == ["S1", "S2", "S3"]
  assert [r["answer"] for r in records] == [3.0, 4.0, 5.0]
  assert report["source"].endswith("svamp_test.jsonl")

  hard = [{"instruction": "H", "response": 123456789.0}, {"instruction": "H2", "response": "x"}]
  records, report = readers.read_eval_set("gsm-hard", _jsonl(tmp_path / "h.jsonl", hard))
  assert records[0]["answer"] == 123456789.0 and math.isinf(records[1]["answer"])
  assert report["gold_unparsed"] == 1

  arith = [{"question": "M", "final_ans": "5"}]
  records, _ = readers.read_eval_set("multiarith", _jsonl(tmp_path / "m.jsonl", arith))
  assert records == [{"question": "M", "answer": 5.0}]

  cs = [{"question": "Which? A) a", "cot": "...", "answer": "A"}]
  records, _ = readers.read_eval_set("commonsense", _jsonl(tmp_path / "cs.jsonl", cs))
  assert records == [{"question": "Which? A) a", "answer": "A"}]

  custom = [{"problem": "P", "solution": "7"}]
  records, _ = readers.read_eval_set(
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
  message = _error(readers.read_eval_set, "gsm8k", str(gsm))
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
    readers.read_eval_set("gsm9k")


def test_hub_without_datasets(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # Makes `import datasets` fail.
  assert _error(readers.read_train_set, "gsm8k-aug").startswith(
    "zen-E/GSM8k-Aug: reading from the HF hub needs the `datasets` package"
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
  message = _error(readers.read_eval_set, "svamp")
  assert message == "ChilleD/SVAMP [test]: row 2: missing field 'Answer'"
  records, report = readers.read_eval_set("svamp", limit=2)
  assert [r["question"] for r in records] == ["A", "B"] and report["source"] == "ChilleD/SVAMP"
  message = _error(readers.read_eval_set, "gsm8k", "other/id")
  assert message == "other/id: no split 'test' (has validation)"
  assert calls[-1] == ("other/id", "main")
  assert _error(readers.read_train_set, "gsm8k-aug", "offline/x") == (
    "offline/x: cannot load from the HF hub (ConnectionError: Couldn't reach the hub); "
    "offline? pass a local .json/.jsonl file"
  )
