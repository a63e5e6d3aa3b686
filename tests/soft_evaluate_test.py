"""soft_jax.evaluate: counts, pass@k recomputed from samples.jsonl, seeds, one-line errors; on a tiny
random HF model (and SmolLM2 on 2 fixture problems, marked slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import zlib

import assets
import cli_util
import pytest
import tiny_hf

from codi_jax.errors import InputError
from codi_jax.models import loader
from soft_jax import evaluate, math_answers, problems
from soft_jax.sampling import SamplerParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "math_problems.jsonl")
PROG = "soft_jax.evaluate"
V = tiny_hf.V
TEMPLATE = tiny_hf.TEMPLATE
SOFT = SamplerParams(
  mode="soft", max_topk=4, top_k=20, after_top_k=20, cold_stop_entropy=0.0, max_thinking_tokens=3
)


def make_tiny_dir(path: str) -> str:
  """A tiny random HF Llama with a word-level tokenizer ("w2".."w99") and a chat template."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
    vocab_size=V,
    num_hidden_layers=2,
    **tiny_hf.HF_SIZES,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
  )
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.5 * torch.randn_like(p))
  model.save_pretrained(path)
  return tiny_hf.write_tokenizer(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
  return make_tiny_dir(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  return loader.load(tiny_dir)


def run_cli(tmp_path, *args, timeout=600) -> subprocess.CompletedProcess:
  return cli_util.run_module(PROG, tmp_path, *args, timeout=timeout)


def assert_usage_error(proc, *needles):
  cli_util.assert_usage_error(proc, PROG, *needles)


def pass_at_k_comb(n: int, c: int, k: int) -> float:
  """Independent pass@k: 1 - C(n-c, k) / C(n, k)."""
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def crc_judge(monkeypatch):
  """Replaces the judge: correct iff the completion's CRC32 is odd (mixed, deterministic outcomes)."""

  def fake(completion, gold, judge=math_answers.DEFAULT_JUDGE, timeout_s=5.0):
    del gold, judge, timeout_s
    return math_answers.Verdict(zlib.crc32(completion.encode()) % 2 == 1, completion[:5], "fake")

  monkeypatch.setattr(math_answers, "check_answer", fake)


def test_counts_pass_at_k_and_seed(tiny, monkeypatch):
  crc_judge(monkeypatch)
  probs = problems.read_problems(FIXTURE, limit=3)
  kw = {
    "n_samples": 4,
    "ks": [1, 2, 4],
    "max_new_tokens": 6,
    "batch_size": 5,
    "length_bucket": 8,
    "seed": 3,
  }
  summary, samples = evaluate.evaluate(tiny.model, tiny.tokenizer, probs, SOFT, **kw)
  assert summary["problems"] == 3 and summary["samples"] == 12 == len(samples)
  assert summary["decoder_compiles"] == 1  # fixed-shape batches: one compile for 3 calls
  assert [(x["problem"], x["sample"]) for x in samples] == [
    (p.id, s) for p in probs for s in range(4)
  ]
  assert len({x["sample_id"] for x in samples}) == 12
  for x in samples:
    assert 1 <= x["completion_tokens"] == len(x["tokens"]) <= 6
    assert x["thinking_tokens"] <= 3
    assert x["stop_reason"] in ("eos", "length")
  # Distinct sample ids give distinct draws (soft trace + sampled answer over 20 candidates).
  assert len({tuple(x["tokens"]) for x in samples}) > 3
  counts = [(4, sum(x["correct"] for x in samples if x["problem"] == p.id)) for p in probs]
  assert 0 < sum(c for _, c in counts) < 12, counts
  for k in (1, 2, 4):
    want = sum(pass_at_k_comb(n, c, k) for n, c in counts) / 3
    assert summary["pass@k"][str(k)] == pytest.approx(want, abs=1e-12)
  assert summary["pass@1"] == pytest.approx(sum(c for _, c in counts) / 12, abs=1e-12)
  lengths = [x["thinking_tokens"] for x in samples]
  assert summary["mean_thinking_tokens"] == pytest.approx(sum(lengths) / 12)
  # Same seed, same output; the batch size does not change a sample (per-sample-id draws).
  _, again = evaluate.evaluate(tiny.model, tiny.tokenizer, probs, SOFT, **{**kw, "batch_size": 3})
  assert [x["tokens"] for x in again] == [x["tokens"] for x in samples]
  _, other = evaluate.evaluate(tiny.model, tiny.tokenizer, probs, SOFT, **{**kw, "seed": 4})
  assert [x["tokens"] for x in other] != [x["tokens"] for x in samples]


def test_cli_writes_files(tmp_path, tiny_dir):
  out = tmp_path / "eval"
  proc = run_cli(
    tmp_path,
    f"--model={tiny_dir}",
    f"--data={FIXTURE}",
    "--mode=gumbel",
    "--limit=2",
    "--n_samples=2",
    "--k=1,2",
    "--max_new_tokens=4",
    "--batch_size=4",
    "--length_bucket=8",
    "--max_topk=4",
    "--top_k=20",
    "--after_top_k=20",
    "--max_thinking_tokens=2",
    "--noprogress",
    f"--out={out}",
  )
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  summary = json.loads((out / "summary.json").read_text())
  lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
  assert len(lines) == 4 == summary["samples"] and summary["problems"] == 2
  assert summary["settings"]["mode"] == "gumbel" and summary["settings"]["sampler"]["max_topk"] == 4
  assert summary["settings"]["judge"] == "math_verify"  # The reference's rule is the default.
  assert set(summary["judges"]) <= {"math_verify"}
  assert set(summary["pass@k"]) == {"1", "2"}
  by = {}
  for x in lines:
    assert {
      "problem",
      "sample",
      "text",
      "tokens",
      "thinking_tokens",
      "stop_reason",
      "prediction",
      "correct",
    } <= set(x)
    by.setdefault(x["problem"], []).append(x["correct"])
  for k in (1, 2):
    want = sum(pass_at_k_comb(len(v), sum(v), k) for v in by.values()) / len(by)
    assert summary["pass@k"][str(k)] == pytest.approx(want)
  assert not [f for f in os.listdir(out) if f.startswith(".tmp_")]
  # The last stdout line is a JSON digest.
  assert json.loads(proc.stdout.strip().splitlines()[-1])["samples"] == 4


def test_cli_missing_answer_field(tmp_path):
  data = tmp_path / "bad.jsonl"
  data.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n')
  assert_usage_error(
    run_cli(tmp_path, f"--data={data}", f"--out={tmp_path / 'o'}"), "bad.jsonl", "line 2", "answer"
  )


def test_cli_bad_sampler_value(tmp_path):
  assert_usage_error(
    run_cli(tmp_path, f"--data={FIXTURE}", f"--out={tmp_path / 'o'}", "--top_p=1.5"), "--top_p"
  )


def test_check_judge(tmp_path):
  probs = problems.read_problems(FIXTURE, limit=3)
  for judge in math_answers.JUDGES:
    evaluate.check_judge(judge, probs)
  latex = [problems.Problem("p7", "Solve x^2 = 4.", "\\pm 2")]
  evaluate.check_judge("math_verify", latex)
  evaluate.check_judge("numeric_then_math_verify", latex)
  with pytest.raises(InputError, match=r"--judge=numeric: problem p7: .* not a plain number"):
    evaluate.check_judge("numeric", latex)
  with pytest.raises(InputError, match="--judge: expected one of math_verify"):
    evaluate.check_judge("auto", probs)


def test_cli_numeric_judge_needs_numbers(tmp_path):
  data = tmp_path / "latex.jsonl"
  data.write_text('{"question": "x^2 = 4?", "answer": "#### \\\\pm 2"}\n')
  proc = run_cli(tmp_path, f"--data={data}", f"--out={tmp_path / 'o'}", "--judge=numeric")
  assert_usage_error(proc, "--judge=numeric", "not a plain number")


def test_cli_bad_k(tmp_path):
  assert_usage_error(
    run_cli(tmp_path, f"--data={FIXTURE}", f"--out={tmp_path / 'o'}", "--n_samples=2", "--k=1,4"),
    "--k",
    "4",
  )


@pytest.mark.slow
def test_smollm2_two_problems(tmp_path):
  assets.smollm2_path()
  out = tmp_path / "smol"
  proc = run_cli(
    tmp_path,
    "--config=configs/soft/smollm2.py",
    f"--data={FIXTURE}",
    "--limit=2",
    "--n_samples=2",
    "--k=1,2",
    "--max_new_tokens=24",
    "--max_thinking_tokens=12",
    "--batch_size=4",
    "--noprogress",
    f"--out={out}",
  )
  assert proc.returncode == 0, proc.stderr
  summary = json.loads((out / "summary.json").read_text())
  assert summary["problems"] == 2 and summary["samples"] == 4
  assert summary["settings"]["model"] == "smollm2" and summary["settings"]["mode"] == "soft"
  lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
  assert all(1 <= len(x["tokens"]) <= 24 and x["thinking_tokens"] <= 12 for x in lines)


# -------------------------------------------- interruptions, reruns and unusable output locations


def _args(tiny_dir, *extra):
  return (
    f"--model={tiny_dir}", f"--data={FIXTURE}", "--max_new_tokens=4", "--length_bucket=8",
    "--max_topk=4", "--top_k=20", "--after_top_k=20", "--max_thinking_tokens=2", "--judge=numeric",
    "--noprogress", *extra,
  )  # fmt: skip


def _files(out):
  return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir())}


def test_cli_unusable_out_is_refused_before_any_work(tmp_path):
  """--out=<a file> or under a read-only directory: one line, exit 2, before the problems are read
  or the model loaded (both are missing here: they would be the error otherwise)."""
  afile = tmp_path / "afile"
  afile.write_text("keep")
  missing = ("--model=/nonexistent", f"--data={tmp_path / 'missing.jsonl'}")
  assert_usage_error(
    run_cli(tmp_path, *missing, f"--out={afile}"), "--out", afile, "not a directory"
  )
  assert afile.read_text() == "keep"
  ro = tmp_path / "ro"
  ro.mkdir()
  proc = cli_util.run_module(PROG, tmp_path, *missing, f"--out={ro / 'o'}", read_only=[ro])
  assert_usage_error(proc, "--out", ro / "o", "cannot create the directory")


def test_ctrl_c_after_8_of_24_samples_then_resume(tmp_path, tiny_dir):
  """Ctrl-C (a real SIGINT) once the first batch of 8 samples is on disk: one line, exit 130, the 8
  samples kept; the same command then decodes the other 16 and writes exactly what an
  uninterrupted run writes."""
  args = _args(tiny_dir, "--limit=3", "--n_samples=8", "--k=1,8", "--batch_size=8")
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  proc = run_cli(tmp_path, *args, f"--out={whole}")
  assert proc.returncode == 0, proc.stderr
  stopped = cli_util.stop_after(
    PROG, tmp_path, "codi_jax.results:Journal.append", *args, f"--out={cut}"
  )
  proc = stopped.interrupt()
  assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines() == [
    f"{PROG}: interrupted after 8 of 24 samples; partial results in {cut}; rerun the same "
    "command to resume"
  ]
  partial = cut / "samples.partial.jsonl"
  assert len(partial.read_text().splitlines()) == 1 + 8 and not (cut / "summary.json").exists()

  proc = run_cli(tmp_path, *args, f"--out={cut}")
  assert proc.returncode == 0, proc.stderr
  assert "resuming after 8 of 24 samples" in proc.stderr and not partial.exists()
  assert (cut / "samples.jsonl").read_text() == (whole / "samples.jsonl").read_text()
  a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, cut))
  assert a["decoder_compiles"] == 1 and b["decoder_compiles"] == 2  # one per session
  for s in (a, b):
    del s["seconds"], s["tokens_per_second"], s["decoder_compiles"]  # measured
  assert a == b and proc.stdout == run_cli(tmp_path, *args, f"--out={whole}").stdout


def test_cli_rerun_keeps_refuses_or_overwrites(tmp_path, tiny_dir):
  """The same --out again: the same settings keep the complete result (no file touched), other
  settings are refused in one line naming the field, --overwrite replaces it."""
  args = _args(tiny_dir, "--limit=2", "--n_samples=2", "--k=1,2", "--batch_size=4")
  out = tmp_path / "eval"
  first = run_cli(tmp_path, *args, f"--out={out}")
  assert first.returncode == 0, first.stderr
  before = _files(out)
  again = run_cli(tmp_path, *args, f"--out={out}")
  assert again.returncode == 0 and "kept the complete result" in again.stderr, again.stderr
  assert again.stdout == first.stdout and _files(out) == before
  assert_usage_error(
    run_cli(tmp_path, *args, "--seed=1", f"--out={out}"),
    "summary.json holds a complete result of another evaluation",
    "settings.seed: 0 there, 1 now",
    "--overwrite",
  )
  assert _files(out) == before
  proc = run_cli(tmp_path, *args, "--seed=1", "--overwrite", f"--out={out}")
  assert proc.returncode == 0, proc.stderr
  summary = json.loads((out / "summary.json").read_text())
  assert summary["settings"]["seed"] == 1 and summary["identity"]["settings"]["seed"] == 1
  assert sorted(_files(out)) == sorted(before)
