"""Synthetic problems: determinism, disjoint splits, difficulty knobs, answers matching the CoT."""

import re

import pytest

from codi_jax.data import readers, synthetic
from codi_jax.errors import InputError

_STEP = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>")
_APPLY = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}


def _parse(record):
  """(a, op, n, result) of each `<<a op n=result>>` step."""
  steps = []
  for step in record["steps"]:
    a, op, n, r = _STEP.fullmatch(step).groups()
    steps.append((int(a), op, int(n), int(r)))
  return steps


def test_deterministic_and_prefix_stable():
  a = synthetic.generate("train", 200, seed=3)
  assert a == synthetic.generate("train", 200, seed=3)
  assert synthetic.generate("train", 50, seed=3) == a[:50]
  assert a != synthetic.generate("train", 200, seed=4)


def test_splits_disjoint():
  splits = synthetic.generate_splits({"train": 2000, "valid": 300, "test": 300}, seed=0)
  for name, records in splits.items():
    assert len({r["cot"] for r in records}) == len(records)
    assert all(synthetic.split_of(r["cot"]) == name for r in records)
  for key in ("cot", "question"):
    seen = [{r[key] for r in records} for records in splits.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  # Another seed draws other problems, never crossing splits.
  other = synthetic.generate("test", 300, seed=1)
  assert not {r["cot"] for r in other} & {r["cot"] for r in splits["train"]}


def test_answers_follow_the_chain():
  for record in synthetic.generate("valid", 300, seed=0):
    steps = _parse(record)
    assert [r for *_, r in steps] == record["results"]
    assert record["cot"] == " ".join(record["steps"])
    assert record["answer"] == str(record["results"][-1]) and record["answer"][0].isdigit()
    for k, (a, op, n, r) in enumerate(steps):
      assert _APPLY[op](a, n) == r and r >= 1
      if k:
        assert a == steps[k - 1][3]  # Each step uses the previous result.
      assert str(n) in record["question"]


def test_difficulty_knobs():
  d = synthetic.Difficulty(
    min_steps=2, max_steps=2, min_operand=3, max_operand=6, max_value=200, ops=("+", "*")
  )
  records = synthetic.generate("train", 200, seed=0, difficulty=d)
  for record in records:
    steps = _parse(record)
    assert len(steps) == 2
    for k, (a, op, n, r) in enumerate(steps):
      assert op in d.ops and 3 <= n <= 6 and r <= 200
      if k == 0:
        assert 3 <= a <= 6
  longer = synthetic.generate("train", 50, difficulty=synthetic.Difficulty(6, 6))
  assert all(len(r["steps"]) == 6 for r in longer)


def test_difficulty_errors():
  with pytest.raises(InputError, match="min_steps"):
    synthetic.generate("train", 1, difficulty=synthetic.Difficulty(min_steps=3, max_steps=2))
  with pytest.raises(InputError, match="ops"):
    synthetic.generate("train", 1, difficulty=synthetic.Difficulty(ops=("^",)))
  with pytest.raises(InputError, match="split"):
    synthetic.generate("dev", 1)
  tiny = synthetic.Difficulty(1, 1, 1, 2, 4, ("+",))
  with pytest.raises(InputError, match="distinct"):
    synthetic.generate("train", 100, difficulty=tiny)


def test_cleaned_like_gsm8k_aug():
  raw = synthetic.generate("train", 20)
  records, report = readers.prepare_train_records(raw, source="synthetic")
  assert report["kept"] == 20
  for r, c in zip(raw, records):
    assert c["cot"] == " ".join(r["steps"][:-1]) and c["answer"] == r["answer"]
    assert c["results"] == [float(x) for x in r["results"]]


def test_terse_style_keeps_chains_and_shortens_questions():
  story = synthetic.generate("train", 100, seed=5)
  terse = synthetic.generate("train", 100, seed=5, difficulty=synthetic.Difficulty(style="terse"))
  assert [r["cot"] for r in terse] == [r["cot"] for r in story]  # same chains, same splits
  words = lambda rs: sum(len(r["question"].split()) for r in rs)  # noqa: E731
  assert words(terse) < 0.7 * words(story)
  for r in terse:  # every operand of the chain is stated in the question
    a, _, n, _ = _parse(r)[0]
    assert str(a) in r["question"] and str(n) in r["question"]
    assert all(str(n) in r["question"] for _, _, n, _ in _parse(r)[1:])


def test_difficulty_from_config():
  d = synthetic.Difficulty.from_config(
    {"train": 10, "valid": 2, "test": 2, "ops": ["+"], "style": "terse"}
  )
  assert d == synthetic.Difficulty(ops=("+",), style="terse")
  with pytest.raises(InputError, match="unknown keys.*stlye"):
    synthetic.Difficulty.from_config({"stlye": "terse"})
  with pytest.raises(InputError, match="style"):
    synthetic.generate("train", 1, difficulty=synthetic.Difficulty(style="poem"))
