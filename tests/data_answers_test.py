"""Answer extraction and scoring: the reference's edge cases, as a table."""

import math

import pytest

from codi_jax.data import answers

INF = math.inf


@pytest.mark.parametrize(
  "text, expected",
  [
    ("The answer is: 18", 18.0),
    ("The answer is: -5", -5.0),
    ("The answer is: 3.50", 3.5),
    ("The answer is: 18.", 18.0),
    ("He has 1,000 apples", 1000.0),
    ("The answer is: 1,234.5", 1234.5),
    ("no number here", INF),
    ("", INF),
    ("3 apples and 4 pears make 7", 7.0),
    ("5-3", -3.0),  # '-3' is the last match, as in the reference.
    ("2.3.4", 4.0),
    ("costs .5 dollars", 5.0),
    ("12abc", 12.0),
    ("The answer is: 18<|endoftext|>", 18.0),
  ],
)
def test_extract_math(text, expected):
  assert answers.extract_math(text) == expected
  assert answers.extract_answer(text, "math") == expected


@pytest.mark.parametrize(
  "text, expected",
  [
    ("The answer is: B", "B"),
    ("The answer is:   E", "E"),
    ("The answer is: F", "C"),
    ("The answer is: b", "C"),
    ("The answer is:", "C"),
    ("", "C"),
    ("A", "A"),  # No prompt: the whole text's first character.
    ("The answer is: A. The answer is: D", "D"),
    ("The answer is: 3", 3.0),  # A number wins, as in the reference.
  ],
)
def test_extract_commonsense(text, expected):
  assert answers.extract_commonsense(text) == expected
  assert answers.extract_answer(text, "commonsense") == expected


@pytest.mark.parametrize(
  "text, expected",
  [("The answer is: True", True), ("False", False), ("maybe", None), ("2 things", 2.0)],
)
def test_extract_strategy(text, expected):
  assert answers.extract_strategy(text) == expected


def test_extract_unknown_task():
  with pytest.raises(ValueError, match="unknown task"):
    answers.extract_answer("1", "poetry")


@pytest.mark.parametrize(
  "value, expected",
  [
    ("Natalia sold 48 clips... #### 72", 72.0),
    ("#### 1,000", 1000.0),
    ("-3", -3.0),
    ("3.50", 3.5),
    (12, 12.0),
    (3.5, 3.5),
    (True, True),
    ("True", True),
    ("False", False),
    ("A", "A"),
    ("abc", INF),
  ],
)
def test_gold_answer(value, expected):
  assert answers.gold_answer(value) == expected
  assert type(answers.gold_answer(value)) is type(expected)


@pytest.mark.parametrize(
  "pred, gold, ok",
  [
    (18.0, 18.0, True),
    (18.0, 18, True),
    (18.0, 18.5, False),
    ("A", "A", True),
    ("C", "A", False),
    (3.0, "C", False),
    (True, True, True),
    (INF, 18.0, False),
  ],
)
def test_is_correct(pred, gold, ok):
  assert answers.is_correct(pred, gold) is ok


def test_accuracy():
  preds = [answers.extract_math(t) for t in ["The answer is: 18", "7", "none"]]
  assert answers.accuracy(preds, [18.0, 8.0, 1.0]) == pytest.approx(1 / 3)
  with pytest.raises(ValueError):
    answers.accuracy([1.0], [])
