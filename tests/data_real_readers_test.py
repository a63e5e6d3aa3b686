"""Readers on the real public files: GSM8k conversions, `||` files and the evaluation sets."""

import json
import math

import pytest
import shared_data

from codi_jax.data import eval_sets, formats, sources

NO_DROPS = dict.fromkeys(("missing_field", "not_text", "empty_question", "no_####", "no_||"), 0)
NO_DROPS["bad_answer"] = 0

# The first three lines of GSM8k's train.jsonl, written out by hand.
Q1 = (
  "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
  "How many clips did Natalia sell altogether in April and May?"
)
Q2 = (
  "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
  "How much did she earn?"
)
Q3 = (
  "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she "
  "needs. Her parents decided to give her $15 for that purpose, and her grandparents twice as much "
  "as her parents. How much more money does Betty need to buy the wallet?"
)
AUG_FIRST3 = [
  {
    "question": Q1,
    "cot": "<<48/2=24>>",
    "answer": "72",
    "steps": ["<<48/2=24>>", "<<48+24=72>>"],
    "results": [24.0, 72.0],
  },
  {
    "question": Q2,
    "cot": "<<12/60=0.2>>",
    "answer": "10",
    "steps": ["<<12/60=0.2>>", "<<0.2*50=10>>"],
    "results": [0.2, 10.0],
  },
  {
    "question": Q3,
    "cot": "<<100/2=50>> <<15*2=30>>",
    "answer": "5",
    "steps": ["<<100/2=50>>", "<<15*2=30>>", "<<100-50-30-15=5>>"],
    "results": [50.0, 30.0, 5.0],
  },
]
NL_FIRST3 = [
  {
    "question": Q1,
    "cot": "Natalia sold 48/2 = 24 clips in May.\n",
    "answer": "72",
    "steps": [
      "Natalia sold 48/2 = 24 clips in May",
      "Natalia sold 48+24 = 72 clips altogether in April and May.",
    ],
  },
  {
    "question": Q2,
    "cot": "Weng earns 12/60 = $0.2 per minute.\n",
    "answer": "10",
    "steps": [
      "Weng earns 12/60 = $0.2 per minute",
      "Working 50 minutes, she earned 0.2 x 50 = $10.",
    ],
  },
  {
    "question": Q3,
    "cot": "In the beginning, Betty has only 100 / 2 = $50. "
    "Betty's grandparents gave her 15 * 2 = $30.\n",
    "answer": "5",
    "steps": [
      "In the beginning, Betty has only 100 / 2 = $50",
      "Betty's grandparents gave her 15 * 2 = $30",
      "This means, Betty needs 100 - 50 - 30 - 15 = $5 more.",
    ],
  },
]


@pytest.fixture(scope="module")
def gsm8k_train():
  return str(shared_data.path("gsm8k", "train.jsonl"))


def test_gsm8k_train_aug_style(gsm8k_train):
  records, report = sources.read_train_file("gsm8k-aug", gsm8k_train)
  assert (report["read"], report["kept"], report["format"]) == (7473, 7470, "gsm8k-jsonl")
  # Only the reference's filter drops rows: the three negative answers (lines 5716, 5845, 6190).
  filters = {"null_answer": 0, "empty_answer": 0, "non_digit_answer": 3}
  assert report["dropped"] == {**NO_DROPS, **filters}
  assert report["bad_rows"] == [] and report["empty_cot"] == 95  # 95 rows have no <<..>> step.
  assert records[:3] == AUG_FIRST3
  full, report = sources.read_train_file("gsm8k-aug", gsm8k_train, include_last_cot=True)
  assert report["kept"] == 7470 and full[0]["cot"] == "<<48/2=24>> <<48+24=72>>"
  _, report = sources.read_train_file("gsm8k-aug", gsm8k_train, keep_non_digit_answers=True)
  assert report["kept"] == 7473


def test_gsm8k_negative_answers_are_the_filtered_rows(gsm8k_train):
  rows, report = formats.gsm8k_train_rows(gsm8k_train)
  assert report["kept"] == 7473
  negative = [(where.rsplit(" ", 1)[1], r["answer"]) for where, r in rows if r["answer"][0] == "-"]
  assert negative == [("5716", "-7"), ("5845", "-47"), ("6190", "-12")]
  assert sum("," in r["answer"] for _, r in rows) == 0  # 79 answers had commas, all removed.


def test_gsm8k_train_nl_style(gsm8k_train):
  records, report = sources.read_train_file("gsm8k-aug-nl", gsm8k_train)
  assert (report["read"], report["kept"]) == (7473, 7470)
  assert report["dropped"]["non_digit_answer"] == 3 and report["empty_cot"] == 0
  assert records[:3] == NL_FIRST3
  assert sum(not r["cot"] for r in records) == 0  # Every row keeps all but its last line.
  assert not any("<<" in r["cot"] or ">>" in r["cot"] for r in records)


def test_gsm8k_test_converts_to_gsm8k_aug_test_file():
  """GSM8k's test set, converted, is GSM8k-Aug's test file line for line (answers sans commas)."""
  converted, _ = formats.gsm8k_train_rows(shared_data.path("gsm8k", "test.jsonl"))
  lines, report = formats.pipe_rows(shared_data.path("gsm8k_aug", "test.txt"))
  assert len(converted) == len(lines) == report["kept"] == 1319
  for (_, a), (_, b) in zip(converted, lines):
    assert (a["question"], a["cot"], a["answer"]) == (
      b["question"],
      b["cot"],
      b["answer"].replace(",", ""),
    )


def test_pipe_files():
  records, report = sources.read_train_file("gsm8k-aug", shared_data.path("gsm8k_aug", "valid.txt"))
  assert (report["read"], report["kept"], report["format"]) == (500, 500, "pipe-lines")
  assert report["empty_cot"] == 6 and report["bad_rows"] == []
  assert records[0]["question"] == (
    "John cuts his grass to 2 inches.  It grows .5 inches per month.  When it gets to 4 inches he "
    "cuts it back down to 2 inches.  It cost $100 to get his grass cut.  How much does he pay per "
    "year?"
  )
  assert records[0]["cot"] == "<<4-2=2>> <<2/.5=4>> <<12/4=3>>"
  assert records[0]["answer"] == "300"
  _, report = sources.read_train_file("gsm8k-aug", shared_data.path("gsm8k_aug", "test.txt"))
  assert (report["read"], report["kept"], report["dropped"]["non_digit_answer"]) == (1319, 1317, 2)


def test_multiplication_pipe_file():
  rows, report = formats.pipe_rows(shared_data.path("multiplication", "4_by_4", "valid.txt"))
  assert (report["read"], report["kept"]) == (1000, 1000)
  assert rows[0][1]["question"] == "5 6 3 2 * 7 4 3 4"
  assert rows[0][1]["answer"] == "5 5 6 0 8 2 0 1"
  assert rows[0][1]["cot"].startswith("5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) +")


def _eval(name):
  shared_data.path(eval_sets.EVAL_FILES[eval_sets.set_name(name)][0])  # Skips if missing.
  data = eval_sets.load_eval_data(name, data_dir=shared_data.DATA_ROOT)
  return data.questions, data.golds, data.report


def _counts(report):
  return report["read"], report["kept"], sum(report["dropped"].values())


def test_gsm8k_test_set():
  questions, golds, report = _eval("gsm8k")
  assert _counts(report) == (1319, 1319, 0) and len(questions) == 1319
  assert questions[0].startswith("Janet’s ducks lay 16 eggs per day.") and golds[0] == 18.0
  aug_questions, aug_golds, _ = _eval("gsm8k_aug_test")
  assert aug_golds == golds and aug_questions == questions  # Same set, two layouts.
  data = eval_sets.load_eval_data("gsm8k", data_dir=shared_data.DATA_ROOT, limit=2)
  assert len(data.questions) == 2 and "<<16-3-4=9>>" in data.cots[0]  # For probing.


def test_svamp():
  questions, golds, report = _eval("svamp")
  assert _counts(report) == (1000, 1000, 0)
  assert questions[0] == (
    "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
    "How much do you have to pay to buy each pack?"
  )
  assert golds[:3] == [51.0, 1.0, 17.0] and golds[-1] == 11.0
  assert all(g.is_integer() for g in golds)


def test_gsm_hard():
  questions, golds, report = _eval("gsm-hard")
  assert _counts(report) == (1319, 1319, 0) and report["name"] == "gsm_hard"
  assert "with 4933828." in questions[0] and golds[0] == -9867630.0
  assert golds[-1] == 2180.0
  assert sum(not g.is_integer() for g in golds) == 303  # Floats: compare numerically.
  assert max(abs(g) for g in golds) == 9284017268534.4


def test_multiarith():
  questions, golds, report = _eval("multiarith")
  assert _counts(report) == (600, 600, 0) and "180-row" in report["note"]
  assert questions[0].startswith("For Halloween Debby and her sister") and golds[0] == 39.0
  assert golds[-1] == 2.0 and all(math.isfinite(g) for g in golds)


def test_eval_reports_are_json():
  _eval("svamp")
  sets = {
    n: eval_sets.load_eval_data(n, data_dir=shared_data.DATA_ROOT, limit=5)
    for n in ("gsm8k", "svamp")
  }
  assert {k: len(v.questions) for k, v in sets.items()} == {"gsm8k": 5, "svamp": 5}
  assert json.loads(json.dumps(sets["svamp"].report))["used"] == 5
