"""iCoT multiplication: exact reproduction of the released lines, the generator, the records."""

import pytest
import shared_data

from codi_jax.data import multiplication
from codi_jax.errors import InputError

SPLITS = ("valid", "test")


@pytest.fixture(scope="module")
def released():
  """{K: {split: lines}} of the released valid/test files."""
  root = shared_data.path("multiplication")
  return {
    k: {s: multiplication.read_lines(root / f"{k}_by_{k}" / f"{s}.txt") for s in SPLITS}
    for k in multiplication.SIZES
  }


def test_reproduces_every_released_line(released):
  for k, splits in released.items():
    for split, lines in splits.items():
      assert len(lines) == 1000, (k, split)
      for n, line in enumerate(lines, 1):
        a, b = multiplication.parse_line(line)
        assert 10 ** (k - 1) <= min(a, b) and max(a, b) < 10**k, (k, split, n)  # no leading 0
        assert multiplication.format_line(a, b, k) == line, (k, split, n)


def test_hand_computed_4x4():
  a, b = 1234, 5608  # b has a zero digit; the product has 7 digits, padded to 8
  assert (a * 8, a * 0 * 10, a * 6 * 100, a * 5 * 1000) == (9872, 0, 740400, 6170000)
  assert 9872 + 740400 == 750272 and 750272 + 6170000 == 6920272 == a * b  # running sums
  line = (
    "4 3 2 1 * 8 0 6 5||"
    "2 7 8 9 0"  # 9872 in K+1 = 5 digits
    " + 0 0 0 0 0 0 ( 2 7 8 9 0 0 )"  # 0 in 6 digits; running sum 9872
    " + 0 0 4 0 4 7 0 ( 2 7 2 0 5 7 0 )"  # 740400 in 7 digits; running sum 750272
    " + 0 0 0 0 7 1 6 0"  # 6170000 in 8 digits; no running sum after the last
    " #### 2 7 2 0 2 9 6 0"  # 6920272 in 2K = 8 digits
  )
  assert multiplication.format_line(a, b, 4) == line
  assert multiplication.parse_line(line) == (a, b)
  assert multiplication.parse_line("4 3 2 1 * 8 0 6 5") == (a, b)
  question, cot, answer = multiplication.split_line(line)
  assert question == "4 3 2 1 * 8 0 6 5" and answer == "2 7 2 0 2 9 6 0"
  [record] = multiplication.records([line + "\n"])
  assert record == dict(
    question=question,
    cot=cot,
    answer=answer,
    steps=[
      "2 7 8 9 0",
      "0 0 0 0 0 0 ( 2 7 8 9 0 0 )",
      "0 0 4 0 4 7 0 ( 2 7 2 0 5 7 0 )",
      "0 0 0 0 7 1 6 0",
    ],
    results=[9872, 9872, 750272, 6920272],
  )


def test_generate_deterministic_distinct_and_disjoint(released):
  for k in (4, 9):
    held_out = {multiplication.parse_line(x) for s in SPLITS for x in released[k][s]}
    lines = multiplication.generate(3000, k, 7, exclude=held_out)
    assert lines == multiplication.generate(3000, k, 7, exclude=held_out)
    assert multiplication.generate(500, k, 7, exclude=held_out) == lines[:500]  # prefix-stable
    assert lines != multiplication.generate(3000, k, 8, exclude=held_out)
    pairs = [multiplication.parse_line(x) for x in lines]
    assert len(set(pairs)) == len(pairs) and not set(pairs) & held_out
    assert all(10 ** (k - 1) <= min(p) and max(p) < 10**k for p in pairs)
    assert [r["answer"] for r in multiplication.records(lines[:50])] == [
      multiplication.format_answer(a, b, k) for a, b in pairs[:50]
    ]


def test_generate_exhausts_small_space():
  exclude = {(1, 1), (9, 9), (10, 3)}  # (10, 3) is not a 1-digit pair: ignored
  lines = multiplication.generate(79, 1, 0, exclude=exclude)
  pairs = {multiplication.parse_line(x) for x in lines}
  assert pairs == {(a, b) for a in range(1, 10) for b in range(1, 10)} - exclude
  assert multiplication.format_line(3, 4, 1) == "3 * 4||2 1 #### 2 1"
  with pytest.raises(InputError, match="only 79 distinct"):
    multiplication.generate(80, 1, 0, exclude=exclude)


def test_bad_input():
  with pytest.raises(InputError, match="at most 4 digits"):
    multiplication.format_line(12345, 1, 4)
  with pytest.raises(InputError, match="question"):
    multiplication.split_line("1 2 * 3 4 #### 2 1")
  with pytest.raises(InputError, match="different lengths"):
    multiplication.parse_line("1 2 * 3 4 5")
  with pytest.raises(InputError, match="digits"):
    multiplication.parse_line("1 2 * 3 x")
  good = multiplication.format_line(1234, 5678, 4)
  with pytest.raises(InputError, match="f.txt: line 2: not the iCoT line of 1234 \\* 5678"):
    multiplication.records([good, good.replace("####", "+ 0 ####")], source="f.txt")
  with pytest.raises(InputError, match="no such file"):
    multiplication.read_lines("/nonexistent/valid.txt")
