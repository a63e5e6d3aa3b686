"""Reading math problems (GSM8K, MATH500, AIME, reference layouts), building math prompts, and the
per-benchmark presets of configs/soft."""

import json
import os

import pytest

from codi_jax.errors import InputError
from soft_jax import cli_common, problems
from soft_jax.problems import Problem

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "math_problems.jsonl")
PRESETS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "soft"
)


def _write(tmp_path, name, records=None, text=None):
  path = tmp_path / name
  if text is None:
    text = "".join(json.dumps(r) + "\n" for r in records)
  path.write_text(text, encoding="utf-8")
  return str(path)


def test_fixture_gsm8k_layout():
  ps = problems.read_problems(FIXTURE, layout="gsm8k")
  assert len(ps) == 12
  assert [p.id for p in ps] == [str(i) for i in range(12)]
  assert ps[0].question == "What is 7 + 5?"
  assert ps[0].answer == "12"
  assert ps[0].meta == {"source": f"{FIXTURE}: line 1", "solution": "7 + 5 = <<7+5=12>>12"}
  answers = [p.answer for p in ps]
  assert answers == [
    "12",
    "7",
    "12",
    "6",
    "6",
    "24",
    "5",
    "10",
    "1,000",
    "-2",
    "\\frac{1}{4}",
    "3/2",
  ]
  assert problems.read_problems(FIXTURE) == ps  # "auto" reads GSM8K files the same way.
  assert len(problems.read_problems(FIXTURE, limit=3)) == 3


def test_math500_layout(tmp_path):
  record = {
    "problem": "Convert $(0,3)$ to polar coordinates.",
    "solution": "... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
    "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
    "subject": "Precalculus",
    "level": 2,
    "unique_id": "test/precalculus/807.json",
  }
  path = _write(tmp_path, "math500.jsonl", [record])
  for layout in ("math500", "auto"):
    (p,) = problems.read_problems(path, layout=layout)
    assert p.id == "test/precalculus/807.json"
    assert p.answer == record["answer"] and p.question == record["problem"]
    assert p.meta["solution"] == record["solution"] and p.meta["level"] == 2
    assert "answer" not in p.meta and "unique_id" not in p.meta


@pytest.mark.parametrize(
  "record,pid,answer",
  [
    # AI-MO/aimo-validation-aime.
    ({"id": 60, "problem": "Find x.", "solution": "...", "answer": "204", "url": "u"}, "60", "204"),
    # Maxwell-Jia/AIME_2024.
    ({"ID": "2024-I-1", "Problem": "Find x.", "Solution": "...", "Answer": 204}, "2024-I-1", "204"),
    # math-ai/aime24 style.
    ({"id": 0, "problem": "Find x.", "answer": "033"}, "0", "033"),
  ],
)
def test_aime_layouts(tmp_path, record, pid, answer):
  path = _write(tmp_path, "aime.jsonl", [record])
  for layout in ("aime", "auto"):
    (p,) = problems.read_problems(path, layout=layout)
    assert (p.id, p.question, p.answer) == (pid, "Find x.", answer)


def test_reference_json_list_layout(tmp_path):
  records = [
    {"prompt": [{"from": "user", "value": "What is 2 + 2?"}], "final_answer": "4"},
    {"prompt": [{"from": "user", "value": "What is 3 + 3?"}], "final_answer": 6},
  ]
  text = "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"
  path = _write(tmp_path, "gsm8k.json", text=text)
  for layout in ("softthinking", "auto"):
    ps = problems.read_problems(path, layout=layout)
    assert [(p.question, p.answer) for p in ps] == [
      ("What is 2 + 2?", "4"),
      ("What is 3 + 3?", "6"),
    ]
    assert ps[1].meta["source"] == f"{path}: line 3"


def test_custom_fields(tmp_path):
  path = _write(tmp_path, "x.jsonl", [{"q": "What is 1 + 1?", "gold": 2.0, "key": "a"}])
  (p,) = problems.read_problems(path, question_field="q", answer_field="gold", id_field="key")
  assert p == Problem("a", "What is 1 + 1?", "2", {"source": f"{path}: line 1"})


def test_plain_answer_in_auto_layout(tmp_path):
  path = _write(tmp_path, "x.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}])
  assert problems.read_problems(path)[0].answer == "2"
  with pytest.raises(InputError, match=r"x.jsonl: line 1: field 'answer' has no '#### <answer>'"):
    problems.read_problems(path, layout="gsm8k")


@pytest.mark.parametrize(
  "text,layout,message",
  [
    (
      '{"question": "a", "answer": "#### 1"}\n{"question": "b", "answer": \n',
      "gsm8k",
      r"bad.jsonl: line 2: invalid JSON",
    ),
    (
      '{"question": "a", "answer": "#### 1"}\n\n{"question": "b"}\n',
      "gsm8k",
      r"bad.jsonl: line 3: missing field 'answer'",
    ),
    ('{"answer": "#### 1"}\n', "gsm8k", r"bad.jsonl: line 1: missing field 'question'"),
    ('{"Problem": "a"}\n', "aime", r"bad.jsonl: line 1: missing field 'answer' \(or 'Answer'\)"),
    (
      '{"question": "a", "answer": null}\n',
      "auto",
      r"bad.jsonl: line 1: field 'answer' must be text or a number, got NoneType",
    ),
    ('{"question": "a", "answer": true}\n', "auto", r"line 1: field 'answer' must be text"),
    ('{"question": "a", "answer": "#### "}\n', "gsm8k", r"line 1: field 'answer' is empty"),
    ('{"question": " ", "answer": "1"}\n', "auto", r"line 1: field 'question' is empty"),
    ('{"question": 3, "answer": "1"}\n', "auto", r"line 1: field 'question' must be text, got int"),
    (
      '{"prompt": [{"from": "gpt", "value": "x"}], "final_answer": "1"}\n',
      "softthinking",
      r"line 1: field 'prompt' must be text or a list of user turns",
    ),
    ("[1, 2]\n", "auto", r"line 1: expected a JSON object"),
    (
      '{"id": 1, "problem": "a", "answer": "1"}\n{"id": 1, "problem": "b", "answer": "2"}\n',
      "aime",
      r"line 2: field 'id': duplicate id '1' \(first at .*bad.jsonl: line 1\)",
    ),
    ("", "auto", r"bad.jsonl: no problems"),
    ("\n  \n", "auto", r"bad.jsonl: no problems"),
  ],
)
def test_bad_input(tmp_path, text, layout, message):
  path = _write(tmp_path, "bad.jsonl", text=text)
  with pytest.raises(InputError, match=message):
    problems.read_problems(path, layout=layout)


def test_bad_arguments(tmp_path):
  with pytest.raises(InputError, match="no such file"):
    problems.read_problems(str(tmp_path / "missing.jsonl"))
  with pytest.raises(InputError, match="unknown problem layout 'mmlu'"):
    problems.read_problems(FIXTURE, layout="mmlu")
  with pytest.raises(InputError, match="limit"):
    problems.read_problems(FIXTURE, limit=0)
  path = _write(tmp_path, "x.jsonl", [{"question": "a", "answer": "1"}])
  with pytest.raises(InputError, match=r"line 1: missing field 'key'"):
    problems.read_problems(path, id_field="key")


class _OurStyleTokenizer:
  """Like codi_jax's Tokenizer: extra keyword arguments become template variables."""

  def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
    del kwargs
    body = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
    return body + ("<|assistant|>" if add_generation_prompt else "")


class _HFStyleTokenizer(_OurStyleTokenizer):
  """Like transformers: token ids unless tokenize=False."""

  def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, **kwargs):
    text = super().apply_chat_template(messages, add_generation_prompt)
    return [len(text)] if tokenize else text


def test_build_math_prompt():
  want = (
    "<|user|>Please reason step by step, and put your final answer within \\boxed{}.\n\n"
    "What is 7 + 5?<|end|><|assistant|>"
  )
  for tok in (_OurStyleTokenizer(), _HFStyleTokenizer()):
    assert problems.build_math_prompt(tok, "What is 7 + 5?\n") == want
  custom = problems.build_math_prompt(_OurStyleTokenizer(), "Q", instruction="Solve it.")
  assert custom == "<|user|>Solve it.\n\nQ<|end|><|assistant|>"


def test_build_math_prompt_with_codi_tokenizer():
  from codi_jax.models import tokenizer_bpe

  tok = tokenizer_bpe.train_bpe(["What is 7 + 5?"], vocab_size=300)
  tok.chat_template = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
  )
  text = problems.build_math_prompt(tok, "What is 7 + 5?")
  assert text == f"[user] {problems.MATH_INSTRUCTION}\n\nWhat is 7 + 5?\n[assistant]"


# ---------------------------------------------------------------------------------------------
# Per-benchmark presets (docs/soft_thinking.md 7): `configs/soft/<model>.py:variant[,benchmark]`

# (benchmark, K, Gumbel tau) as in the 2508.03440 run scripts; None: no benchmark given.
STOCHASTIC_BY_BENCHMARK = [
  ("aime2024", 15, 0.5),
  ("aime2025", 15, 0.5),
  ("amc23", 15, 0.5),
  ("math500", 10, 0.6),
  ("gpqa_diamond", 10, 0.6),
  ("humaneval", 10, 0.5),
  ("mbpp", 10, 0.5),
  ("livecodebench", 10, 0.5),
  (None, 10, 0.5),
]


@pytest.mark.parametrize("model", ["qwq", "deepseek_r1_qwen", "llama", "smollm2"])
@pytest.mark.parametrize("variant", ["dirichlet", "gumbel"])
@pytest.mark.parametrize("bench,max_topk,tau", STOCHASTIC_BY_BENCHMARK)
def test_stochastic_presets_per_benchmark(model, variant, bench, max_topk, tau):
  # (Not `benchmark`: pytest-benchmark owns that fixture name.)
  spec = f"{PRESETS}/{model}.py:{variant}" + (f",{bench}" if bench else "")
  cfg = cli_common.load_config(spec)
  assert cfg.mode == variant
  params = cli_common.sampler_params(cfg.mode, cfg)
  assert (params.max_topk, params.gumbel_tau, params.dirichlet_alpha) == (max_topk, tau, 4.0)
  # The rest of the 2508.03440 scripts, the same on every benchmark.
  assert (params.temperature, params.after_temperature, params.min_p) == (0.6, 0.6, 0.0)
  assert params.entropy_normalized and params.cold_stop_entropy == 0.1
  assert params.cold_stop_patience == cfg.max_new_tokens  # Cold Stop never fires.
  # A flag still wins over the preset.
  assert cli_common.sampler_params(cfg.mode, cfg, {"max_topk": 7}).max_topk == 7


@pytest.mark.parametrize("variant", ["soft", "sample", "greedy"])
def test_other_variants_ignore_the_benchmark(variant):
  plain = cli_common.load_config(f"{PRESETS}/qwq.py:{variant}").to_dict()
  for bench in ("aime2024", "math500", "mbpp"):
    assert cli_common.load_config(f"{PRESETS}/qwq.py:{variant},{bench}").to_dict() == plain
  assert plain["sampler"]["max_topk"] == 10
  assert cli_common.load_config(f"{PRESETS}/qwq.py").to_dict() == (
    cli_common.load_config(f"{PRESETS}/qwq.py:soft").to_dict()
  )


@pytest.mark.parametrize(
  "arg,message",
  [
    ("gumbel,gsm8k", "unknown benchmark 'gsm8k'"),
    ("gumbel,MATH500", "unknown benchmark 'MATH500'"),
    ("math500", "unknown variant 'math500'"),
    ("gumbel,math500,extra", "unknown benchmark 'math500,extra'"),
  ],
)
def test_bad_preset_arg(arg, message):
  with pytest.raises(InputError, match=message):
    cli_common.load_config(f"{PRESETS}/qwq.py:{arg}")
