"""`python -m soft_jax.generate`: JSON output equal to the in-process Generator, one-line errors."""

from __future__ import annotations

import json
import subprocess

import assets
import cli_util
import pytest
import tiny_hf

from codi_jax.decoding import Generator
from codi_jax.models import loader

PROG = "soft_jax.generate"
V = tiny_hf.V  # tiny vocabulary: "<eos>" (0), "<unk>" (1), "w2" ... "w99"
TEMPLATE = tiny_hf.TEMPLATE


def run_cli(tmp_path, *args, timeout=600) -> subprocess.CompletedProcess:
  return cli_util.run_module(PROG, tmp_path, *args, timeout=timeout)


def last_json(proc: subprocess.CompletedProcess) -> dict:
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_usage_error(proc, *needles):
  cli_util.assert_usage_error(proc, PROG, *needles)


def _smol_path() -> str:
  return assets.smollm2_path()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
  """A tiny random HF Llama with a word-level tokenizer and a chat template."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
    vocab_size=V,
    **tiny_hf.HF_SIZES,
    num_hidden_layers=2,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
  )
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = str(tmp_path_factory.mktemp("tiny_llama"))
  model.save_pretrained(path)
  return tiny_hf.write_tokenizer(path)


def _in_process(spec: str, prompt_ids: list[list[int]], max_new: int) -> list[list[int]]:
  loaded = loader.load(spec)
  tok = loaded.tokenizer
  pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
  return Generator(loaded.model, pad_id=pad, eos_ids=tok.eos_ids)(prompt_ids, max_new)


# ---------------------------------------------------------------------------------------------
# Output


def test_json_chat_batch_tiny(tmp_path, tiny_dir):
  proc = run_cli(
    tmp_path,
    f"--model={tiny_dir}",
    "--prompt=w7 w8 w9",
    "--prompt=w20",
    "--chat",
    "--json",
    "--max_new_tokens=5",
  )
  out = last_json(proc)["results"]
  assert [r["prompt"] for r in out] == ["w7 w8 w9", "w20"]
  assert [r["prompt_tokens"] for r in out] == [[3, 7, 8, 9, 4, 5], [3, 20, 4, 5]]
  want = _in_process(tiny_dir, [r["prompt_tokens"] for r in out], 5)
  assert [r["tokens"] for r in out] == want
  loaded_tok = loader.load(tiny_dir).tokenizer
  for r in out:
    assert r["text"] == loaded_tok.decode(r["tokens"])
    assert r["stop_reason"] == ("eos" if r["tokens"][-1] == 0 else "length")
    assert 1 <= len(r["tokens"]) <= 5
    assert r["model"] == tiny_dir and r["mode"] == "greedy"
  # Texts are printed first, one line per prompt, then the JSON line.
  assert len(proc.stdout.strip().splitlines()) == 3


@pytest.fixture(scope="module")
def smol():
  _smol_path()
  return loader.load("smollm2")


@pytest.mark.slow
def test_json_smollm2(tmp_path, smol):
  prompt = "The capital of France is"
  out = last_json(
    run_cli(tmp_path, "--model=smollm2", f"--prompt={prompt}", "--max_new_tokens=12", "--json")
  )
  assert {"prompt_tokens", "tokens", "text", "stop_reason"} <= set(out)
  tok = smol.tokenizer
  assert out["prompt_tokens"] == tok.encode(prompt, add_special_tokens=True)
  want = Generator(smol.model, pad_id=tok.pad_id, eos_ids=tok.eos_ids)([out["prompt_tokens"]], 12)[
    0
  ]
  assert out["tokens"] == want
  assert out["text"] == tok.decode(want)
  assert out["stop_reason"] == ("eos" if want[-1] in tok.eos_ids else "length")


@pytest.mark.slow
def test_chat_smollm2(tmp_path, smol):
  question = "What is 12 + 7?"
  out = last_json(
    run_cli(
      tmp_path, "--model=smollm2", f"--prompt={question}", "--max_new_tokens=8", "--chat", "--json"
    )
  )
  tok = smol.tokenizer
  templated = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))
  assert out["prompt_tokens"] == templated
  head, tail = tok.encode("<|im_start|>system\n"), tok.encode("<|im_end|>\n<|im_start|>assistant\n")
  assert out["prompt_tokens"][: len(head)] == head and out["prompt_tokens"][-len(tail) :] == tail
  assert out["prompt"] == question
  want = Generator(smol.model, pad_id=tok.pad_id, eos_ids=tok.eos_ids)([templated], 8)[0]
  assert out["tokens"] == want


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line on stderr, no traceback


def test_missing_path(tmp_path):
  missing = tmp_path / "nope"
  assert_usage_error(run_cli(tmp_path, f"--model={missing}", "--prompt=hi"), missing)


def test_dir_without_config(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  assert_usage_error(run_cli(tmp_path, f"--model={empty}", "--prompt=hi"), empty, "config.json")


def test_unsupported_architecture(tmp_path):
  bert = tmp_path / "bert"
  bert.mkdir()
  (bert / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
  assert_usage_error(
    run_cli(tmp_path, f"--model={bert}", "--prompt=hi"),
    bert / "config.json",
    "unsupported architecture",
    "bert",
  )


def test_truncated_gguf(tmp_path):
  cut = tmp_path / "cut.gguf"
  with open(_smol_path(), "rb") as f:
    cut.write_bytes(f.read(1 << 20))
  assert_usage_error(run_cli(tmp_path, f"--model={cut}", "--prompt=hi"), cut, "GGUF")


def test_hub_id_offline(tmp_path):
  assert_usage_error(
    run_cli(tmp_path, "--model=someorg/not-a-model", "--prompt=hi"), "someorg/not-a-model"
  )


def test_empty_prompt(tmp_path):
  # Prompts are validated before any model is loaded, so a missing model does not matter.
  assert_usage_error(
    run_cli(tmp_path, f"--model={tmp_path / 'nope'}", "--prompt="), "--prompt", "empty"
  )


def test_no_prompt(tmp_path):
  assert_usage_error(run_cli(tmp_path, f"--model={tmp_path / 'nope'}"), "--prompt")


def test_zero_max_new_tokens(tmp_path):
  assert_usage_error(
    run_cli(tmp_path, f"--model={tmp_path / 'nope'}", "--prompt=hi", "--max_new_tokens=0"),
    "--max_new_tokens",
    "0",
  )


# ---------------------------------------------------------------------------------------------
# Soft Thinking modes (--mode and sampler flags, --config)

SOFT_MODES = ["greedy", "sample", "soft", "dirichlet", "gumbel"]


def test_soft_mode_json_tiny(tmp_path, tiny_dir):
  # w9 plays `</think>`: a single token of the word-level vocabulary; the budget forces it.
  out = last_json(
    run_cli(
      tmp_path,
      f"--model={tiny_dir}",
      "--prompt=w7 w8 w9",
      "--mode=soft",
      "--max_topk=3",
      "--think_end=w9",
      "--max_thinking_tokens=3",
      "--max_new_tokens=6",
      "--json",
    )
  )
  assert out["mode"] == "soft" and out["think_end_id"] == 9
  assert out["prompt_tokens"] == [7, 8, 9]
  assert out["thinking_tokens"] <= 3 and 9 in out["tokens"][:3]
  assert out["sampler"]["max_topk"] == 3 and out["sampler"]["temperature"] == 0.6
  loaded_tok = loader.load(tiny_dir).tokenizer
  assert out["text"] == loaded_tok.decode(out["tokens"])
  assert out["answer_text"] == loaded_tok.decode(out["tokens"][out["thinking_tokens"] :])


def test_greedy_mode_json_has_thinking_tokens(tmp_path, tiny_dir):
  out = last_json(
    run_cli(
      tmp_path,
      f"--model={tiny_dir}",
      "--prompt=w20",
      "--mode=greedy",
      "--max_new_tokens=5",
      "--json",
    )
  )
  assert out["mode"] == "greedy"
  assert out["tokens"] == _in_process(tiny_dir, [out["prompt_tokens"]], 5)[0]
  # `</think>` is not in this vocabulary (it encodes to <unk>, which must not be taken for it).
  assert out["think_end_id"] is None and out["thinking_tokens"] == len(out["tokens"])


def test_config_file_with_flag_overrides(tmp_path, tiny_dir):
  out = last_json(
    run_cli(
      tmp_path,
      "--config=configs/soft/smollm2.py:gumbel",
      f"--model={tiny_dir}",
      "--prompt=w7 w8",
      "--chat=false",
      "--gumbel_tau=0.7",
      "--max_topk=5",
      "--max_new_tokens=4",
      "--json",
    )
  )
  s = out["sampler"]
  assert out["mode"] == "gumbel" and out["model"] == tiny_dir
  assert out["prompt_tokens"] == [7, 8]  # --chat=false won over the config's chat template
  assert s["gumbel_tau"] == 0.7 and s["max_topk"] == 5  # flags win over the preset
  assert s["entropy_normalized"] is True and s["min_p"] == 0.0  # the SST preset
  assert 1 <= len(out["tokens"]) <= 4


def test_config_field_overrides_as_training_and_short_flags_win(tmp_path, tiny_dir):
  out = last_json(
    run_cli(
      tmp_path,
      "--config=configs/soft/smollm2.py:gumbel",
      "--config.sampler.gumbel_tau=0.7",
      "--config.sampler.max_topk=5",
      "--config.sampler.temperature=0.3",
      "--config.chat=False",
      "--config.max_new_tokens=3",
      "--temperature=0.9",  # the short flag is an alias of config.sampler.temperature and wins
      f"--model={tiny_dir}",
      "--prompt=w7 w8",
      "--json",
    )
  )
  s = out["sampler"]
  assert s["gumbel_tau"] == 0.7 and s["max_topk"] == 5 and s["temperature"] == 0.9
  assert out["prompt_tokens"] == [7, 8] and 1 <= len(out["tokens"]) <= 3
  assert s["entropy_normalized"] is True  # the rest of the SST preset is kept


@pytest.mark.parametrize(
  "override, needles",
  [
    ("--config.sampler.top_p=2.0", ["--config=configs/soft/smollm2.py:gumbel", "sampler.top_p"]),
    ("--config.sampler.temprature=1.0", ["override", "temperature"]),
  ],
)
def test_bad_config_field_overrides_are_one_line(tmp_path, override, needles):
  proc = run_cli(
    tmp_path, "--config=configs/soft/smollm2.py:gumbel", override, "--model=nope", "--prompt=hi"
  )
  assert_usage_error(proc, *needles)


@pytest.mark.parametrize(
  "args, needles",
  [
    (["--mode=beam"], ["--mode", "beam"]),
    (["--mode=soft", "--max_topk=40"], ["--max_topk", "40", "top_k"]),
    (["--mode=soft", "--temperature=-1"], ["--temperature", "-1"]),
    (["--mode=dirichlet", "--dirichlet_alpha=0"], ["--dirichlet_alpha"]),
    (["--mode=gumbel", "--gumbel_tau=-0.5"], ["--gumbel_tau"]),
    (["--mode=soft", "--top_p=1.5"], ["--top_p"]),
    (["--mode=soft", "--after_temperature=hot"], ["--after_temperature", "hot"]),
  ],
)
def test_bad_sampler_flags(tmp_path, args, needles):
  # Checked before any model is loaded, so a missing model does not matter.
  assert_usage_error(
    run_cli(tmp_path, f"--model={tmp_path / 'nope'}", "--prompt=hi", *args), *needles
  )


def test_multi_token_think_end(tmp_path, tiny_dir):
  assert_usage_error(
    run_cli(tmp_path, f"--model={tiny_dir}", "--prompt=w7", "--mode=soft", "--think_end=w7 w8"),
    "--think_end",
    "2 tokens",
  )


@pytest.mark.slow
def test_every_mode_smollm2(tmp_path, smol):
  tok = smol.tokenizer
  for mode in SOFT_MODES:
    out = last_json(
      run_cli(
        tmp_path,
        "--model=smollm2",
        "--prompt=What is 12 + 7?",
        "--chat",
        f"--mode={mode}",
        "--max_new_tokens=8",
        "--max_thinking_tokens=4" if mode != "greedy" else "--seed=0",
        "--json",
      )
    )
    assert out["mode"] == mode
    assert 1 <= len(out["tokens"]) <= 8 and out["text"] == tok.decode(out["tokens"])
    if mode == "greedy":
      want = Generator(smol.model, pad_id=tok.pad_id, eos_ids=tok.eos_ids)(
        [out["prompt_tokens"]], 8
      )
      assert out["tokens"] == want[0] and out["thinking_tokens"] == len(out["tokens"])
    else:
      assert out["thinking_tokens"] == min(4, len(out["tokens"]))  # no `</think>`: the budget


@pytest.mark.parametrize("mode", ["greedy", "gumbel"])
def test_mesh_flag_shards_and_keeps_tokens(tmp_path, tiny_dir, mode):
  """--mesh on 4 simulated devices (tensor parallel x data) emits what one device does."""
  args = [
    f"--model={tiny_dir}",
    "--prompt=w7 w8 w9",
    "--prompt=w20",
    f"--mode={mode}",
    "--max_new_tokens=6",
    "--json",
  ]
  one = last_json(run_cli(tmp_path, *args))
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  four = last_json(cli_util.run_module(PROG, tmp_path, *args, "--mesh=2,1,-1", extra_env=env))
  assert [r["tokens"] for r in four["results"]] == [r["tokens"] for r in one["results"]]


def test_bad_mesh_flag(tmp_path):
  assert_usage_error(
    run_cli(tmp_path, f"--model={tmp_path / 'nope'}", "--prompt=hi", "--mesh=2,2"),
    "--mesh",
    "data,fsdp,tensor",
  )
  assert_usage_error(
    run_cli(tmp_path, f"--model={tmp_path / 'nope'}", "--prompt=hi", "--mesh=3,1,1"),
    "--mesh",
    "uses 3 devices",
  )
