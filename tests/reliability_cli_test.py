"""Nothing starts that cannot finish: each case of the issue's table is now one line and exit 2,
before any work (the real CLIs, in subprocesses)."""

from __future__ import annotations

import assets
import cli_util
import pytest
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
