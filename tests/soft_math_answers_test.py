"""Answer checking for soft-thinking evaluation: the three judges, their rules, timeouts."""

import functools
import signal
import threading
import time
from fractions import Fraction

import pytest

from soft_jax import math_answers as ma
from soft_jax.math_answers import Number

# (gold, completion, correct, judge that decides under "numeric_then_math_verify", prediction read).
COMBINED_CASES = [
  # GSM8K-style plain numbers: the numeric rule decides.
  ("72", "so the answer is \\boxed{72}.", True, "numeric", "72"),
  ("Natalia sold 48 clips.\n#### 72", "\\boxed{72}", True, "numeric", "72"),
  ("72", "She sold 48 + 24 = 72 clips.\n#### 72", True, "numeric", "72"),
  ("12", "The answer is 12 apples.", True, "numeric", "12"),
  ("12", "The answer is 7 + 5 = 12", True, "numeric", "12"),
  ("12", "7+5=12", True, "numeric", "12"),
  ("12", "7 + 5 = 12. Then we add 3 to get 15", False, "numeric", "15"),
  ("15", "She has 3 boxes. The total is 3 * 5 = 15 pencils.", True, "numeric", "15"),
  ("5", "The final answer is 5. I hope it is correct.", True, "numeric", "5"),
  # Commas, currency, negatives, fractions vs decimals, percents.
  ("1234", "The answer is 1,234.", True, "numeric", "1,234"),
  ("1,234", "\\boxed{1234}", True, "numeric", "1234"),
  ("1234", "\\boxed{1{,}234}", True, "numeric", "1{,}234"),
  ("5", "It costs $5.00.", True, "numeric", "$5.00"),
  ("$5.00", "\\boxed{5}", True, "numeric", "5"),
  ("-3", "\\boxed{-3}", True, "numeric", "-3"),
  ("3", "\\boxed{-3}", False, "numeric", "-3"),
  ("-2", "It drops to -2 degrees.", True, "numeric", "-2"),
  ("0.75", "3/4", True, "numeric", "3/4"),
  ("3/4", "The answer is 0.75", True, "numeric", "0.75"),
  ("1/3", "\\boxed{0.333333}", True, "numeric", "0.333333"),
  ("1/3", "\\boxed{0.3333}", False, "numeric", "0.3333"),
  ("12", "\\boxed{12.0}", True, "numeric", "12.0"),
  ("033", "\\boxed{33}", True, "numeric", "33"),
  ("10\\%", "\\boxed{10\\%}", True, "numeric", "10\\%"),
  ("10\\%", "\\boxed{0.1}", True, "numeric", "0.1"),
  ("12", "\\boxed{12\\%}", True, "numeric", "12\\%"),  # math_verify: 12% equals 12.
  # Nested braces, \text{} and units.
  ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}}", True, "numeric", "\\frac{1}{2}"),
  ("0.5", "\\boxed{\\dfrac{1}{2}}", True, "numeric", "\\dfrac{1}{2}"),
  ("-\\frac{3}{4}", "\\boxed{-0.75}", True, "numeric", "-0.75"),
  ("5", "\\boxed{5 \\text{ apples}}", True, "numeric", "5 \\text{ apples}"),
  ("5", "\\boxed{\\text{5}}", True, "numeric", "\\text{5}"),
  ("5", "\\boxed{5\\text{ cm}}", True, "numeric", "5\\text{ cm}"),
  ("5", "\\boxed{5 \\text{ m}}", True, "math_verify", "5"),  # One-letter unit: math_verify.
  ("18", "The answer is $\\frac{36}{2}$.", True, "numeric", "$36/2"),
  # Several boxes: the last one counts, with the boxes close before it (a set of answers).
  (
    "12",
    "<think>maybe \\boxed{5}. Let me check it again.</think> So \\boxed{12}.",
    True,
    "numeric",
    "12",
  ),
  (
    "5",
    "<think>maybe \\boxed{5}. Let me check it again.</think> So \\boxed{12}.",
    False,
    "numeric",
    "12",
  ),
  # Close boxes with a separator read as a set {5, 12}: neither 5 nor 12 alone.
  (
    "12",
    "<think>maybe \\boxed{5}, let me check it again.</think> So \\boxed{12}.",
    False,
    "math_verify",
    "5,12",
  ),
  ("12", "first \\boxed{5} then \\boxed{12}", False, "math_verify", "5,12"),
  ("12", "\\boxed{12} or \\boxed{12}", True, "numeric", "12"),
  ("2", "\\boxed{\\frac{1}{\\boxed{2}}}", True, "numeric", "2"),  # The inner box is read.
  # Expressions: math_verify decides.
  ("9", "so 12 - 3", True, "math_verify", "12 - 3"),
  ("5", "\\boxed{x=5}", True, "math_verify", "x=5"),
  ("1000000", "\\boxed{10^6}", True, "math_verify", "10^6"),
  ("2", "\\boxed{\\sqrt{4}}", True, "math_verify", "\\sqrt{4}"),
  ("3.5", "\\boxed{3 \\frac{1}{2}}", True, "math_verify", "3 \\frac{1}{2}"),
  ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}", True, "math_verify", "\\text{Evelyn}"),
  (
    "(3, \\frac{\\pi}{2})",
    "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
    True,
    "math_verify",
    "( 3, \\frac{\\pi}{2} )",
  ),
  ("x^2+7x+10", "\\boxed{(x+2)(x+5)}", True, "math_verify", "(x+2)(x+5)"),
  # No answer at all.
  ("12", "no answer here", False, "math_verify", None),
  ("12", "", False, "math_verify", None),
  ("12", "\\boxed{}", False, "math_verify", None),
  ("12", "\\boxed{12", False, "math_verify", None),
]

# Verdict tests judge without the wall-clock bound: on a loaded machine a symbolic check can run
# past it (then "timeout", wrong), which says nothing about the verdict; the bound has its own tests.
check = functools.partial(ma.check_answer, timeout_s=None)


@pytest.mark.parametrize("gold,completion,correct,judge,prediction", COMBINED_CASES)
def test_numeric_then_math_verify_judge(gold, completion, correct, judge, prediction):
  v = check(completion, gold, judge="numeric_then_math_verify")
  assert (v.correct, v.judge, v.prediction) == (correct, judge, prediction)
  if prediction is None:
    assert v.note == ma.NO_ANSWER


# Where the numeric rule reads a completion better than math_verify (documented in the module).
DIFFERENCES = [
  ("5", "It costs \\$5.00."),
  ("-7", "The answer is \u22127"),
  ("1234", "\\boxed{1\\,234}"),
]


@pytest.mark.parametrize("gold,completion", DIFFERENCES)
def test_documented_differences(gold, completion):
  assert check(completion, gold, judge="numeric_then_math_verify").correct
  assert check(completion, gold, judge="numeric").correct
  assert not check(completion, gold, judge="math_verify").correct
  assert not check(completion, gold).correct  # The default is math_verify.


# A review probe: an answer, then a check whose last number is not the answer.
DOUBLE_CHECK = "The answer is 19. Let me double check: 19 - 7 = 12."


@pytest.mark.parametrize(
  "gold,judge,verdict",
  [
    ("19", "math_verify", ma.Verdict(False, "12", "math_verify")),
    ("19", "numeric", ma.Verdict(True, "19", "numeric")),
    ("19", "numeric_then_math_verify", ma.Verdict(True, "19", "numeric")),
    ("12", "math_verify", ma.Verdict(True, "12", "math_verify")),
    ("12", "numeric", ma.Verdict(False, "19", "numeric")),
    ("12", "numeric_then_math_verify", ma.Verdict(False, "19", "numeric")),
  ],
)
def test_judges_disagree_on_a_double_check(gold, judge, verdict):
  assert check(DOUBLE_CHECK, gold, judge=judge) == verdict


def test_default_judge_is_math_verify():
  assert ma.DEFAULT_JUDGE == "math_verify" == ma.JUDGES[0]
  assert check(DOUBLE_CHECK, "19") == ma.Verdict(False, "12", "math_verify")
  assert check("\\boxed{4}", "4").judge == "math_verify"  # Even for plain numbers.
  with pytest.raises(ValueError, match="unknown judge"):
    check("5", "5", judge="auto")  # The old name of numeric_then_math_verify.


@pytest.mark.parametrize("gold,completion,correct,judge,prediction", COMBINED_CASES)
def test_reference_judge_agrees_elsewhere(gold, completion, correct, judge, prediction):
  del judge, prediction
  assert check(completion, gold, judge="math_verify").correct == correct


def test_numeric_judge_alone():
  assert check("\\boxed{x=5}", "5", judge="numeric") == ma.Verdict(
    False, None, "numeric", ma.NO_ANSWER
  )
  assert check("nothing", "5", judge="numeric").note == ma.NO_ANSWER
  assert check("The answer is 5.", "5", judge="numeric").correct
  with pytest.raises(ValueError, match="plain-number gold"):
    check("\\boxed{x}", "x^2", judge="numeric")
  with pytest.raises(ValueError, match="unknown judge"):
    check("5", "5", judge="llm")


@pytest.mark.parametrize(
  "answer,text",
  [
    ("Natalia sold 24 clips in May.\n#### 72", "72"),
    ("#### 1,234 ", "1,234"),
    (72, "72"),
    (72.0, "72"),
    (0.5, "0.5"),
    (" \\frac{1}{2} ", "\\frac{1}{2}"),
  ],
)
def test_gold_text(answer, text):
  assert ma.gold_text(answer) == text


@pytest.mark.parametrize("answer", [None, True, "", "####  ", "  "])
def test_gold_text_rejects(answer):
  with pytest.raises(ValueError, match="gold answer"):
    ma.gold_text(answer)


@pytest.mark.parametrize(
  "text,number",
  [
    ("42", Number(Fraction(42), True)),
    ("-42", Number(Fraction(-42), True)),
    ("1,234,567", Number(Fraction(1234567), True)),
    ("$5.00", Number(Fraction(5), False)),
    ("\\$ 5", Number(Fraction(5), True)),
    ("3/4", Number(Fraction(3, 4), True)),
    ("\\frac{3}{4}", Number(Fraction(3, 4), True)),
    ("-\\dfrac{3}{4}", Number(Fraction(-3, 4), True)),
    ("12%", Number(Fraction(12), True, True)),
    ("12 percent", Number(Fraction(12), True, True)),
    ("5 \\text{ apples}", Number(Fraction(5), True)),
    ("5 apples.", Number(Fraction(5), True)),
    ("90^\\circ", Number(Fraction(90), True)),
    (".5", Number(Fraction(1, 2), False)),
    ("\u22127", Number(Fraction(-7), True)),
  ],
)
def test_parse_number(text, number):
  assert ma.parse_number(text) == number


@pytest.mark.parametrize(
  "text",
  ["", "x", "5x", "5 m", "3 \\frac{1}{2}", "1,23", "5 and 12", "2\\pi", "1/0", "10^6", "5 pi"],
)
def test_parse_number_rejects(text):
  assert ma.parse_number(text) is None


def test_numbers_equal():
  n = ma.parse_number
  assert ma.numbers_equal(n("12"), n("12.0"))
  assert ma.numbers_equal(n("1/3"), n("0.333333"))
  assert not ma.numbers_equal(n("1/3"), n("0.333"))
  assert ma.numbers_equal(n("9%"), n("9"))
  assert ma.numbers_equal(n("75%"), n("3/4"))
  assert ma.numbers_equal(n("50%"), n("0.5"))
  assert not ma.numbers_equal(n("12%"), n("12.0"))  # As math_verify: a decimal compares 0.12.
  assert not ma.numbers_equal(n("12"), n("12.00001"))


@pytest.mark.parametrize(
  "text,boxes",
  [
    ("no box", []),
    ("\\boxed{\\frac{1}{2}}", ["\\frac{1}{2}"]),
    ("a \\boxed{1} b \\boxed{2}", ["1", "2"]),  # Under 10 characters apart: a set.
    ("\\boxed{1}, and then after some thought \\boxed{2}", ["1", "2"]),  # Separator, under 70.
    ("\\boxed{1} then after a lot of thought \\boxed{2}", ["2"]),  # No separator: the last.
    ("\\boxed{2} and \\boxed{2}", ["2"]),
    ("\\fbox{3}", ["3"]),
    ("\\boxed {4}", ["4"]),
    ("\\boxed{\\frac{1}{\\boxed{2}}}", ["2"]),
    ("\\boxed{12", None),
    ("\\boxed 12", None),
  ],
)
def test_boxed_answers(text, boxes):
  assert ma.boxed_answers(text) == boxes


def test_fixture_golds_parse_as_numbers():
  from soft_jax import problems

  for p in problems.read_problems("tests/fixtures/math_problems.jsonl", layout="gsm8k"):
    assert ma.parse_number(p.answer) is not None, p


def test_check_in_a_thread():
  """math_verify's signal timeouts fail outside the main thread; ours step aside there."""
  out = {}

  def work():
    out["latex"] = ma.check_answer("\\boxed{\\sqrt{4}}", "2")
    out["numeric"] = ma.check_answer("\\boxed{4}", "4", judge="numeric")

  t = threading.Thread(target=work)
  t.start()
  t.join(30)
  assert out["latex"] == ma.Verdict(True, "\\sqrt{4}", "math_verify")
  assert out["numeric"] == ma.Verdict(True, "4", "numeric")


def test_timeout(monkeypatch):
  # Counted, not timed: each check's slow parse is cut short by the alarm (TIMEOUT), never
  # finishing its 60 s sleep (a loaded machine slows the check; it cannot make the alarm skip).
  ma._parse_gold("x")  # math_verify imported and the gold cached: the alarm meets `slow`
  cut, finished = [], []

  def slow(completion):
    del completion
    try:
      time.sleep(60)
    except BaseException as e:
      cut.append(type(e))
      raise
    finished.append(True)

  monkeypatch.setattr(ma, "_parse_prediction", slow)

  def sentinel(signum, frame):
    del signum, frame

  old = signal.signal(signal.SIGALRM, sentinel)
  try:
    v = ma.check_answer("\\boxed{x}", "x", timeout_s=0.2)
    assert not finished and set(cut) <= {ma._Timeout}, (cut, finished)
    assert v == ma.Verdict(False, None, "math_verify", ma.TIMEOUT)
    assert signal.getsignal(signal.SIGALRM) is sentinel  # The caller's handler is back.
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    # A timer the caller had set runs on afterwards, less the time the check took: it lost at
    # least the 0.2 s the check was allowed and at most the time the test saw pass.
    before = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, 30)
    assert ma.check_answer("\\boxed{x}", "x", timeout_s=0.2).note == ma.TIMEOUT
    left = signal.getitimer(signal.ITIMER_REAL)[0]
    took = time.monotonic() - before
    assert not finished and set(cut) <= {ma._Timeout}, (cut, finished)
    assert 30 - took - 1e-3 < left < 29.9, (left, took)
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def test_gold_that_math_verify_cannot_read():
  v = ma.check_answer("\\boxed{5}", "\\undefinedmacro{")
  assert not v.correct and v.judge == "math_verify"
