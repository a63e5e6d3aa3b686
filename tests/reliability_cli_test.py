"""Nothing starts that cannot finish: each case of the issue's table is now one line and exit 2,
before any work (the real CLIs, in subprocesses)."""

from __future__ import annotations

import json

import assets
import cli_util
import pytest
import tiny_codi
import tiny_hf

TRAIN, GENERATE = "codi_jax.train", "soft_jax.generate"
HUGE = "--max_new_tokens=100000000"


def one_line(proc, prog: str) -> str:
  cli_util.assert_usage_error(proc, prog)
  return proc.stderr.strip().removeprefix(f"{prog}: error: ")


@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.data.batch_size=0", "--config.data.batch_size: got 0; expected an integer >= 1"),
    ("--config.optim.lr=-1", "--config.optim.lr: got -1.0; expected a number > 0"),
    ("--config.codi.num_latent=-3", "--config.codi.num_latent: got -3; expected an integer >= 0"),
  ],
)
def test_train_refuses_a_bad_value_before_any_work(tmp_path, override, message):
  work = tmp_path / "run"
  proc = cli_util.run_module(
    TRAIN, tmp_path, "--config=configs/demo.py", override, f"--workdir={work}"
  )
  assert one_line(proc, TRAIN) == message
  assert not work.exists()  # validated before the workdir is even created


def test_train_refuses_an_unusable_workdir(tmp_path):
  proc = cli_util.run_module(
    TRAIN, tmp_path, "--config=configs/demo.py", "--workdir=/proc/forbidden"
  )
  assert one_line(proc, TRAIN).startswith("--workdir: /proc/forbidden: cannot create the directory")


def test_train_refuses_a_typo_in_a_config_file(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text(
    "from configs import demo\n\n\ndef get_config():\n  c = demo.get_config()\n"
    "  c.optim.warmup = 0.1\n  return c\n"
  )
  proc = cli_util.run_module(TRAIN, tmp_path, f"--config={path}", f"--workdir={tmp_path / 'w'}")
  assert one_line(proc, TRAIN) == (
    "--config.optim.warmup: unknown field (did you mean optim.warmup_ratio?)"
  )


def test_train_config_file_that_raises(tmp_path):
  path = tmp_path / "raises.py"
  path.write_text("def get_config():\n  raise RuntimeError('boom')\n")
  proc = cli_util.run_module(TRAIN, tmp_path, f"--config={path}", f"--workdir={tmp_path / 'w'}")
  assert one_line(proc, TRAIN) == f"--config={path}: RuntimeError: boom"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
  # 4 kv heads x 64 dims x 2 layers: 4 KiB of cache per slot, so 4 rows of 100M slots need
  # terabytes (refused on any machine) while the weights stay tiny.
  return tiny_hf.write(str(tmp_path_factory.mktemp("tiny")), num_kv_heads=4, head_dim=64)


def test_generate_refuses_past_the_positions_tiny(tmp_path, tiny_dir):
  proc = cli_util.run_module(GENERATE, tmp_path, f"--model={tiny_dir}", "--prompt=w7 w8", HUGE)
  assert one_line(proc, GENERATE) == (
    "--max_new_tokens: got 100000000; a 2-token prompt + 100000000 new tokens need 100,000,002 "
    "positions, past the model's context of 64; expected <= 62, or pass --allow_extrapolation "
    "(RoPE positions past the context: quality degrades)"
  )


@pytest.mark.parametrize("mode", ["greedy", "soft"])
def test_generate_refuses_what_cannot_fit_tiny(tmp_path, tiny_dir, mode):
  prompts = [f"--prompt=w{i} w8" for i in range(7, 11)]
  proc = cli_util.run_module(
    GENERATE, tmp_path, f"--model={tiny_dir}", *prompts, HUGE, "--allow_extrapolation",
    f"--mode={mode}", timeout=300,
  )  # fmt: skip
  message = one_line(proc, GENERATE)
  assert message.startswith("max_new_tokens=100000000: 4 rows x 100000032 cache slots (prompt 32")
  assert "needs about " in message and " is available; lower the batch size" in message


@pytest.mark.slow
def test_generate_refuses_smollm2_past_its_context_and_its_memory(tmp_path):
  assets.smollm2_path()
  proc = cli_util.run_module(GENERATE, tmp_path, "--model=smollm2", "--prompt=hi", HUGE)
  assert one_line(proc, GENERATE) == (
    "--max_new_tokens: got 100000000; a 1-token prompt + 100000000 new tokens need 100,000,001 "
    "positions, past the model's context of 8,192; expected <= 8191, or pass "
    "--allow_extrapolation (RoPE positions past the context: quality degrades)"
  )
  proc = cli_util.run_module(
    GENERATE, tmp_path, "--model=smollm2", "--prompt=hi", HUGE, "--allow_extrapolation"
  )
  message = one_line(proc, GENERATE)
  assert message.startswith(
    "max_new_tokens=100000000: 1 row x 100000032 cache slots (prompt 32 + 100000000 new tokens, "
    "30 layers x 3 kv heads x 64): needs about 7,182.22 GiB (estimate, "
  ), message
  assert "is available" in message and "RESOURCE_EXHAUSTED" not in proc.stderr


# ------------------------------------------------------------------- messages name the real cause


@pytest.mark.parametrize("prog", [TRAIN, "codi_jax.evaluate"])
def test_a_missing_config_file_is_one_line(tmp_path, prog):
  work = tmp_path / "run"
  proc = cli_util.run_module(prog, tmp_path, "--config=configs/nope.py", f"--workdir={work}")
  assert one_line(proc, prog) == "--config: No such file or directory: 'configs/nope.py'"
  assert not work.exists()


def test_an_unknown_config_variant_is_refused(tmp_path):
  work = tmp_path / "run"
  proc = cli_util.run_module(TRAIN, tmp_path, "--config=configs/demo.py:ours", f"--workdir={work}")
  assert one_line(proc, TRAIN) == (
    "--config=configs/demo.py:ours: ValueError: unknown variant(s) ['ours']: this config takes "
    "no variants (drop ':ours')"
  )
  proc = cli_util.run_module(TRAIN, tmp_path, "--config=configs/gpt2.py:our", f"--workdir={work}")
  assert one_line(proc, TRAIN).endswith(
    "unknown variant(s) ['our'] (choose from commonsense, nl, ours)"
  )
  assert not work.exists()


@pytest.mark.parametrize("name", ["folder", "folder.jsonl", "folder.txt"])
def test_a_directory_as_the_data_file_and_no_workdir_left(tmp_path, name):
  """Refused after the workdir was created (reading the data): it is removed again, parents too."""
  (tmp_path / name).mkdir()
  work = tmp_path / "runs" / "run"
  proc = cli_util.run_module(
    TRAIN, tmp_path, "--config=configs/demo.py", "--config.data.source=gsm8k-aug",
    f"--config.data.path={tmp_path / name}", f"--workdir={work}",
  )  # fmt: skip
  message = one_line(proc, TRAIN)
  assert message.startswith(f"{tmp_path / name}: a directory, not a data file"), message
  assert message.endswith("pass a JSON/JSONL file or `question||cot #### answer` lines")
  assert not (tmp_path / "runs").exists()


def test_thoughts_past_the_positions_name_the_thought_count(tmp_path):
  proc = cli_util.run_module(
    TRAIN, tmp_path, "--config=configs/demo.py", "--config.codi.num_latent=100000",
    f"--workdir={tmp_path / 'run'}",
  )  # fmt: skip
  assert one_line(proc, TRAIN) == (
    "--config.codi.num_latent: got 100000; expected <= 252: a question token, <bot>, the "
    "thoughts, <eot> and an answer token must fit model.max_positions=256 (or raise it)"
  )


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> str:
  """A finished run of the demo's tokenizer (BPE fitted to the synthetic task), 256 positions."""
  return tiny_codi.write_finished(tmp_path_factory.mktemp("finished") / "run")


def test_evaluate_blames_the_thoughts_or_the_questions_not_max_new_tokens(tmp_path, finished):
  prog = "codi_jax.evaluate"
  proc = cli_util.run_module(
    prog, tmp_path, f"--workdir={finished}", "--num_latent=100000", "--limit=4",
    f"--out={tmp_path / 'eval'}",
  )  # fmt: skip
  message = one_line(proc, prog)
  assert message.startswith("the longest synthetic_test question (") and (
    "tokens) + [bot] + 100,000 thoughts + [eot] uses " in message
  )
  assert (
    "; the model (gpt2) has 256 learned positions, none left for the 6 new tokens of " in message
  )
  assert message.endswith(
    "(synthetic_test, student); lower --num_latent to at most 214 (one answer token)"
  )
  # GSM8k questions under the demo's tokenizer: the questions alone take more than the positions.
  question = "Natalia sold clips to 48 of her friends in April, and then she sold half " * 6
  (tmp_path / "gsm8k_like.jsonl").write_text(
    json.dumps({"question": question, "answer": "#### 72"})
  )
  proc = cli_util.run_module(
    prog, tmp_path, f"--workdir={finished}", f"--sets={tmp_path / 'gsm8k_like.jsonl'}",
    f"--out={tmp_path / 'eval2'}",
  )  # fmt: skip
  message = one_line(proc, prog)
  assert message.startswith("the longest gsm8k_like question (") and "learned positions" in message
  assert message.endswith(
    "evaluate shorter questions, or train with a larger --config.model.max_positions"
  )


def test_generate_blames_a_prompt_longer_than_the_context(tmp_path, tiny_dir):
  words = " ".join(f"w{i % 90 + 2}" for i in range(70))
  proc = cli_util.run_module(GENERATE, tmp_path, f"--model={tiny_dir}", f"--prompt={words}")
  message = one_line(proc, GENERATE)
  assert message.startswith("a ") and "-token prompt uses " in message, message
  assert "the model (llama) has 64 positions of context, none left for the " in message
  assert message.endswith(
    "new tokens of --max_new_tokens; shorten the prompt, or pass --allow_extrapolation (RoPE "
    "positions past the context: quality degrades)"
  )
