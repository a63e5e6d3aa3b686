"""benchmarks/accelerator.py: the --smoke run (table, JSON, imports, batches) and --flops_only."""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np

from codi_jax.data.codi_batches import Shapes, SpecialIds, collate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "accelerator.py")
# Not on the accelerator machine (jax, flax, optax, orbax, numpy only): importing any fails the run.
ABSENT = (
  "grain",
  "ml_collections",
  "tensorboardX",
  "math_verify",
  "gguf",
  "tokenizers",
  "jinja2",
  "safetensors",
  "huggingface_hub",
  "tqdm",
  "matplotlib",
  "torch",
  "transformers",
)
NOT_APPLICABLE = {  # columns that are "-" by design
  "train": {"decode tok/s", "BW used"},
  "decode": {"TFLOP/s", "MFU formula", "MFU XLA"},
}


def _load_script():
  spec = importlib.util.spec_from_file_location("accelerator_bench", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def _number(cell: str) -> float:
  return float(cell.replace(",", "").rstrip("%"))


def _table(stdout: str) -> list[dict[str, str]]:
  lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
  cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
  header, body = cells[0], cells[2:]
  return [dict(zip(header, row)) for row in body]


def _run_script(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
  """The benchmark in a subprocess on CPU with `args`, the modules in ABSENT unimportable."""
  block = "; ".join(f"sys.modules[{m!r}] = None" for m in ABSENT)
  argv = [SCRIPT, *args]
  code = (
    f"import runpy, sys; {block}; sys.argv = {argv!r}; "
    f"runpy.run_path({SCRIPT!r}, run_name='__main__')"
  )
  return subprocess.run(
    [sys.executable, "-c", code],
    cwd=tmp_path,
    env=dict(os.environ, JAX_PLATFORMS="cpu", **env),
    capture_output=True,
    text=True,
    timeout=1200,
    check=False,
  )


def test_smoke_run_table_json_and_imports(tmp_path):
  out = tmp_path / "table.json"
  # Tiny shapes: XLA:CPU's LLVM optimisation dominates the compile time and buys nothing here.
  xla_flags = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  proc = _run_script(tmp_path, "--smoke", f"--out={out}", XLA_FLAGS=xla_flags)
  assert proc.returncode == 0, proc.stderr[-4000:]
  stdout = proc.stdout
  first = stdout.splitlines()[0]
  needles = ("accelerator benchmark (smoke)", "device cpu", "jax ", "jaxlib ", "attention xla")
  needles += ("load average",)
  for needle in needles:
    assert needle in first, first
  for section in ("decode GPT-2 tiny", "decode Llama tiny", "train GPT-2 tiny", "probes"):
    assert section in stdout, stdout

  rows = _table(stdout)
  keys = {(r["model"], r["workload"], r["batch"]) for r in rows}
  expected = {
    (m, w, b) for m in ("GPT-2 tiny", "Llama tiny") for w in ("greedy", "soft") for b in ("1", "2")
  } | {(m, "train LoRA r8", "2") for m in ("GPT-2 tiny", "Llama tiny")}
  assert keys == expected and len(rows) == len(expected), rows
  for r in rows:
    kind = "train" if r["workload"].startswith("train") else "decode"
    for col, cell in r.items():
      if col in ("model", "workload", "mem src"):
        continue
      if col in NOT_APPLICABLE[kind]:
        assert cell == "-", (r, col)
        continue
      value = _number(cell)
      assert math.isfinite(value) and value > 0, (r, col)
    assert r["mem src"] in ("device", "device<=", "xla", "est"), r

  data = json.loads(out.read_text())
  assert data["header"]["preset"] == "smoke" and data["header"]["jax"]
  assert data["header"]["matmul_flops"] > 0 and data["header"]["copy_bytes_s"] > 0
  assert len(data["rows"]) == len(rows)
  numeric = ("ms", "tok_s", "peak_bytes", "compile_s")
  for r in data["rows"]:
    train = r["workload"].startswith("train")
    fields = numeric + (
      ("flops_formula", "flops_xla", "mfu_formula", "mfu_xla")
      if train
      else ("decode_tok_s", "bytes_per_step", "bw_frac")
    )
    for f in fields:
      assert math.isfinite(r[f]) and r[f] > 0, (r["model"], r["workload"], f, r[f])
    if train:
      assert all(math.isfinite(x) for x in r["losses"])


def test_cudnn_attention_is_refused_off_gpu(tmp_path):
  proc = _run_script(tmp_path, "--smoke", "--attention_impl=cudnn")
  assert proc.returncode != 0 and "--attention_impl=cudnn needs a GPU; jax's backend is cpu" in (
    proc.stderr
  ), proc.stderr[-2000:]
  assert "accelerator benchmark" not in proc.stdout


def test_numpy_batch_matches_the_pipeline_collate():
  acc = _load_script()
  shape = acc.TrainShape(batch=3, question=5, cot=4, answer=6, thoughts=2)
  examples = acc.make_examples(shape, base_vocab=100, eos=99, seed=0)
  ours = acc.collate_full(examples, pad=100, bot=101, eot=102)
  n = shape.lengths()
  theirs = collate(
    examples,
    Shapes(n["question"], n["teacher"], n["decoder"], n["teacher_span"]),
    SpecialIds(pad=100, bot=101, eot=102, eos=99),
  )
  theirs.pop("index")
  assert set(ours) == set(theirs)
  for k, v in theirs.items():
    np.testing.assert_array_equal(ours[k], v, err_msg=k)
    assert ours[k].dtype == v.dtype, k


def test_flop_formula_terms():
  acc = _load_script()
  cfg = acc.GPT2
  shape = acc.TrainShape(batch=1, question=1, cot=0, answer=1, thoughts=0)
  lora = acc.train_flops(cfg, shape, lora_rank=128, full_ft=False)
  full = acc.train_flops(cfg, shape, lora_rank=128, full_ft=True)
  p_dense = 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)  # 84.9M: GPT-2's block matmuls
  # Lt = 2, Lq = 2, La = 2: 6 positions; head at Lw + La - 1 = 1 + 1 positions (the decoder's
  # last position has no next label, so the fused CE computes no logits there).
  assert full["dense"] == 6 * 6 * p_dense
  assert full["head"] == 2 * 6 * 50260 * 768
  p_lora = 12 * 128 * (768 + 2304 + 768 + 768 + 768 + 3072 + 3072 + 768)
  assert lora["dense"] == 6 * (4 * p_dense + 6 * p_lora)
  assert lora["head"] == 2 * 4 * 50260 * 768
  # visible keys: teacher 1 + 2, encoder 1 + 2, decoder 3 + 4
  assert lora["attention"] == 12 * 12 * 64 * 12 * (3 + 3 + 7)
  assert lora["total"] == sum(v for k, v in lora.items() if k != "total")


def _flops_terms(rows: list[dict[str, str]], model: str) -> dict[str, dict[str, str]]:
  return {r["term"]: r for r in rows if r["model"] == model}


def test_flops_only_table_and_the_thought_loop_correction(tmp_path):
  """--flops_only at the smoke shapes (3 thoughts: the scan loop runs twice), then N = 4 in process.

  XLA counts a loop body once: the corrected count must grow by one thought's FLOPs per thought
  (within the attention over one more cache slot), and the trip-counted dots exactly so."""
  out = tmp_path / "flops.json"
  proc = _run_script(tmp_path, "--smoke", "--flops_only", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "load average" in proc.stdout.splitlines()[0]
  rows = _table(proc.stdout)
  for model in ("GPT-2 tiny", "Llama tiny"):
    terms = _flops_terms(rows, model)
    assert list(terms) == [
      "dense",
      "head",
      "attention",
      "prj",
      "other dots",
      "non-dot",
      "total",
      "total, loops once",
    ], rows
    for term in ("dense", "head", "attention", "prj", "total", "total, loops once"):
      assert math.isfinite(_number(terms[term]["XLA / formula"])), terms[term]
    # The tied head runs at exactly the positions the formula counts. The formula counts every
    # input gradient; XLA skips those nothing trainable needs (the first layer's q/k/v of tokens
    # read from the frozen table: 11-14% of the dense work at 1 layer, under 1% at 12). Attention
    # runs over whole masked blocks (about twice the causal count at these lengths).
    assert _number(terms["head"]["XLA / formula"]) == 1.0, terms["head"]
    assert 0.8 <= _number(terms["dense"]["XLA / formula"]) <= 1.0, terms["dense"]
    assert 1.0 <= _number(terms["attention"]["XLA / formula"]) <= 2.5, terms["attention"]
    # Tiny dimensions: norms, softmax, dropout and AdamW are a large share (real shapes:
    # docs/results.md).
    total = _number(terms["total"]["XLA / formula"])
    assert 1.0 < total < 2.5, terms["total"]
    assert total > _number(terms["total, loops once"]["XLA / formula"]), terms

  acc = _load_script()
  p = acc.preset("smoke")
  three = next(r for r in json.loads(out.read_text())["rows"] if r["model"] == "GPT-2 tiny")
  assert three["thoughts"] == 3
  p4 = dataclasses.replace(p, train={"gpt2": dataclasses.replace(p.train["gpt2"], thoughts=4)})
  four = acc.flops_row("gpt2", p4, full_ft=False, seed=0)
  per_thought = three["flops_xla_per_thought"]
  assert per_thought > 0 and four["flops_xla_per_thought"] == per_thought
  step = four["flops_xla"] - three["flops_xla"]
  assert abs(step - per_thought) < 0.25 * per_thought, (step, per_thought)
  # A thought is one position through every layer (all gradients: its input is trainable) and
  # one projection; no LM head.
  cfg, shape = p.models["gpt2"][1], p.train["gpt2"]
  d3, d4 = three["flops_dots"], four["flops_dots"]
  f3, f4 = three["flops_terms"], four["flops_terms"]
  assert d4["dense"] - d3["dense"] == f4["dense"] - f3["dense"] > 0
  assert d4["prj"] - d3["prj"] == f4["prj"] - f3["prj"] == 6 * shape.batch * 2 * cfg.d_model**2
  assert d4["head"] == d3["head"] == f4["head"]
