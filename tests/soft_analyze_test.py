"""soft_jax.analyze: JS divergence values, the js_probe on a K=1 soft input, ROUGE-L (token and
word level), the EOS cut of rouge and js_probe on crafted traces, randomness monotonicity on a toy
distribution, and every analysis CLI on a tiny saved model."""
# pylint: disable=invalid-name

from __future__ import annotations

import csv
import json
import math
import subprocess
from types import SimpleNamespace

import cli_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soft_jax import analyses, traces
from soft_jax.sampling import SamplerParams

PROG = "soft_jax.analyze"


# ---------------------------------------------------------------------------------------------
# JS divergence


def test_js_identical_is_zero():
  p = jax.nn.softmax(jax.random.normal(jax.random.key(0), (4, 50)), axis=-1)
  np.testing.assert_allclose(traces.js_divergence(p, p), 0.0, atol=1e-7)


@pytest.mark.parametrize(
  "p, q, want",
  [
    ([1.0, 0.0], [0.0, 1.0], math.log(2)),  # disjoint supports: the maximum
    (
      [0.5, 0.5],
      [1.0, 0.0],
      0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2)) + 0.5 * math.log(1 / 0.75),
    ),
    (
      [0.25, 0.25, 0.5],
      [0.5, 0.25, 0.25],
      0.25 * math.log(0.25 / 0.375) + 0.5 * math.log(0.5 / 0.375),
    ),
  ],
)
def test_js_known_values(p, q, want):
  assert float(traces.js_divergence(p, q)) == pytest.approx(want, abs=1e-6)
  assert float(traces.js_divergence(q, p)) == pytest.approx(want, abs=1e-6)  # symmetric


# ---------------------------------------------------------------------------------------------
# ROUGE-L


@pytest.mark.parametrize(
  "cand, ref, lcs, f1",
  [
    ([1, 2, 3], [1, 2, 3], 3, 1.0),
    ([1, 2, 3], [4, 5], 0, 0.0),
    ([], [1], 0, 0.0),
    ([1, 2, 3, 4], [1, 3, 4], 3, 2 * (3 / 4) * 1.0 / (3 / 4 + 1.0)),
    ([7, 1, 8, 2, 9, 3], [1, 2, 3], 3, 2 * 0.5 * 1.0 / 1.5),
    (list("ABCBDAB"), list("BDCABA"), 4, 2 * (4 / 7) * (4 / 6) / (4 / 7 + 4 / 6)),
  ],
)
def test_rouge_l_table(cand, ref, lcs, f1):
  assert traces.lcs_length(cand, ref) == lcs
  assert traces.rouge_l(cand, ref)["f1"] == pytest.approx(f1)


# ---------------------------------------------------------------------------------------------
# The EOS cut, and rouge / js_probe on crafted traces


def test_cut_at_eos():
  assert traces.cut_at_eos([5, 6, 0, 7, 0], [0]) == [5, 6]  # The stop id is excluded.
  assert traces.cut_at_eos([5, 6, 7], [0]) == [5, 6, 7]
  assert traces.cut_at_eos([2, 5], [0, 2]) == []
  assert traces.cut_at_eos([5, 6], []) == [5, 6]
  keep = traces.before_eos(np.asarray([[5, 0, 6, 0], [5, 6, 7, 8], [9, 5, 5, 5]]), [0, 9])
  assert keep.tolist() == [
    [True, False, False, False],
    [True, True, True, True],
    [False, False, False, False],
  ]
  assert traces.words("  The cat,\tsat\n\nON  it. ") == ["The", "cat,", "sat", "ON", "it."]


# Token pieces decode BPE-style (concatenated), so words and tokens differ; 0 is the EOS.
PIECES = {0: "<eos>", 1: "The", 2: " cat", 3: " sat", 4: "s", 5: " on"}


class PieceTokenizer:
  eos_ids = (0,)
  eos_id = 0
  pad_id = 0

  def decode(self, ids, skip_special_tokens=True):
    return "".join(PIECES[int(i)] for i in ids if not (skip_special_tokens and int(i) == 0))


# Crafted traces of one prompt: mode -> one token list per draw.
ROUGE_TRACES = {
  "greedy": [[1, 2, 3, 0, 5, 5]],  # cut: The cat sat
  "soft": [[1, 2, 3, 4, 0, 1, 2, 3]],  # cut: The cat sats
  "sample": [[0, 1, 2, 3], [5, 1, 2, 3, 5, 5]],  # cut: nothing; " onThe cat sat on on" (no EOS)
}


def f1(p, r):
  return 2 * p * r / (p + r)


def test_rouge_cuts_at_eos_and_scores_words(tmp_path, monkeypatch):
  class FakeDecoder:
    def __init__(self, model, params, *, pad_id, eos_ids):
      del model, pad_id, eos_ids
      self.mode = params.mode

    def __call__(self, prompts, **kw):
      del kw
      out = ROUGE_TRACES[self.mode]
      assert len(prompts) == len(out)
      return [SimpleNamespace(tokens=t) for t in out]

  monkeypatch.setattr(analyses, "_prepare", lambda tok, texts: ([[5]] * len(texts), None, None))
  monkeypatch.setattr(analyses.decode, "SoftDecoder", FakeDecoder)
  params = SamplerParams(mode="soft", max_topk=4, top_k=20, after_top_k=20)
  summary = analyses.run_rouge(
    None,
    PieceTokenizer(),
    ["q"],
    params,
    modes=["soft", "sample"],
    max_new=8,
    n_samples=2,
    seed=0,
    out_dir=str(tmp_path),
  )
  with open(tmp_path / "rouge.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  got = [
    (r["mode"], int(r["tokens"]), int(r["words"]), float(r["token_f1"]), float(r["word_f1"]))
    for r in rows
  ]
  want = [
    # LCS 3 of 4 vs 3 tokens; words The cat sats vs The cat sat: LCS 2 of 3 and 3.
    ("soft", 4, 3, f1(3 / 4, 1.0), f1(2 / 3, 2 / 3)),
    ("sample", 0, 0, 0.0, 0.0),  # EOS first: an empty trace.
    # LCS 3 of 6 vs 3 tokens; words onThe cat sat on on vs The cat sat: LCS 2 of 5 and 3.
    ("sample", 6, 5, f1(3 / 6, 1.0), f1(2 / 5, 2 / 3)),
  ]
  assert [g[:3] for g in got] == [w[:3] for w in want]
  np.testing.assert_allclose([g[3:] for g in got], [w[3:] for w in want], rtol=1e-12)
  assert summary["greedy_tokens"] == [3]
  assert set(summary["levels"]) == {"token", "word"} and "split" in summary["levels"]["word"]
  by_level = summary["rouge_l_f1"]
  assert by_level["token"]["soft"]["mean"] == pytest.approx(f1(3 / 4, 1.0))
  assert by_level["word"]["soft"]["mean"] == pytest.approx(f1(2 / 3, 2 / 3))
  assert by_level["word"]["sample"]["mean"] == pytest.approx(f1(2 / 5, 2 / 3) / 2)
  assert json.loads((tmp_path / "rouge.json").read_text()) == json.loads(json.dumps(summary))
  assert (tmp_path / "rouge.png").stat().st_size > 0


def test_js_probe_stops_at_eos(tmp_path):
  B, S = 2, 5
  tokens = np.asarray([[1, 2, 0, 3, 4], [1, 2, 3, 4, 5]])  # Row 0 emits EOS at step 2.
  js = np.full((B, S, 3), 0.05, np.float32)
  js[0, :2] = 0.01
  js[0, 2:] = 0.6  # The EOS step and later: must not count.
  w = np.tile(np.asarray([0.7, 0.3], np.float32), (B, S, 1))
  w[1, 4] = [1.0, 0.0]  # One kept step is not a mixture.
  w[0, 3] = [1.0, 0.0]  # After EOS: ignored either way.
  trace = {"js": js, "w": w, "token": tokens}
  params = SamplerParams(mode="soft", max_topk=2, top_k=20, after_top_k=20)
  summary = analyses.run_js_probe(
    None, PieceTokenizer(), ["a", "b"], params, steps=S, seed=0, out_dir=str(tmp_path), trace=trace
  )
  assert summary["steps_kept"] == 7 and summary["eos_step"] == [2, None]
  overall = summary["overall"]["js_top1_soft"]
  assert overall["n"] == 7 and overall["max"] == pytest.approx(0.05)
  assert overall["mean"] == pytest.approx((2 * 0.01 + 5 * 0.05) / 7)
  assert summary["per_prompt"][0]["js_top2_soft"]["n"] == 2
  assert summary["mixed_steps"]["js_top1_soft"]["n"] == 6
  assert summary["mean_w1"] == pytest.approx((6 * 0.7 + 1.0) / 7)
  assert summary["frac_js_top2_above_0.6"] == 0.0
  with open(tmp_path / "js_probe.csv", newline="") as f:
    rows = [(int(r["prompt"]), int(r["step"])) for r in csv.DictReader(f)]
  assert rows == [(0, 0), (0, 1)] + [(1, s) for s in range(S)]
  assert (tmp_path / "js_probe.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# randomness / softness


def test_randomness_monotone_on_toy():
  top_z = jnp.asarray([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0]] * 4)
  params = SamplerParams(mode="soft", temperature=1.0, top_k=8, top_p=1.0, min_p=0.0, max_topk=4)
  keys = jax.random.split(jax.random.key(0), 64)

  def stats(noise, v):
    r, s = traces.noise_randomness(keys, top_z, params, noise=noise, value=v)
    return float(jnp.mean(r)), float(jnp.mean(s))

  dirichlet = [stats("dirichlet", g) for g in (0.1, 1.0, 10.0, 1000.0)]
  rnd, soft = zip(*dirichlet)
  assert list(rnd) == sorted(rnd, reverse=True), rnd  # larger gamma: closer to st
  assert list(soft) == sorted(soft), soft  # larger gamma: softer
  assert rnd[-1] < 0.01  # gamma -> inf recovers the vanilla concept token
  gumbel = [stats("gumbel", t) for t in (0.1, 0.5, 1.0, 5.0)]
  assert [s for _, s in gumbel] == sorted(s for _, s in gumbel)  # larger tau: softer
  assert gumbel[-1][1] < math.log(4) + 1e-5  # at most K entries
  # The reference's metric (softmax of st' first) differs from JS on probabilities.
  r_legacy, _ = traces.noise_randomness(
    keys, top_z, params, noise="dirichlet", value=1000.0, legacy_softmax=True
  )
  assert float(jnp.mean(r_legacy)) > 0.05


# ---------------------------------------------------------------------------------------------
# js_probe / logit_lens on a tiny random model


@pytest.fixture(scope="module")
def tiny_model():
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from codi_jax.models import config as mcfg  # pylint: disable=import-outside-toplevel
  from codi_jax.models import transformer  # pylint: disable=import-outside-toplevel

  m = transformer.build(
    mcfg.tiny("llama", vocab_size=64, dtype="float32", param_dtype="float32"), seed=0
  )
  nnx.update(m, jax.tree.map(lambda x: x * 6.0, nnx.state(m, nnx.Param)))
  return m


IDS = jnp.asarray([[0, 3, 4, 5, 6], [7, 8, 9, 10, 11]], jnp.int32)
MASK = jnp.asarray([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], bool)


def test_js_probe_one_hot_soft_input(tiny_model):
  # K = 1: the soft input is exactly the top-1 embedding, so JS(P1, Pst) = 0 and P2 = P1.
  params = SamplerParams(mode="soft", max_topk=1, top_k=10, after_top_k=10)
  rec = jax.jit(lambda p, i, m, k: traces.js_probe_trace(tiny_model, p, i, m, k, steps=6))(
    params, IDS, MASK, jax.random.key(0)
  )
  assert rec["js"].shape == (2, 6, 3)
  np.testing.assert_allclose(rec["js"], 0.0, atol=1e-6)


def test_js_probe_soft_input_differs(tiny_model):
  params = SamplerParams(
    mode="soft", max_topk=4, top_k=10, after_top_k=10, temperature=1.0, top_p=1.0, min_p=0.0
  )
  rec = traces.js_probe_trace(tiny_model, params, IDS, MASK, jax.random.key(0), steps=6)
  js = np.asarray(rec["js"])
  assert js.min() >= 0 and js.max() <= math.log(2) + 1e-6
  assert js[..., 1].mean() > 0  # a real mixture: the top-2 counterfactual differs
  assert rec["top_z"].shape == (2, 6, 10)
  # The trace follows the soft input: same trace as SoftDecoder's soft mode (no stops).
  from soft_jax.decode import SoftDecoder  # pylint: disable=import-outside-toplevel

  dec = SoftDecoder(tiny_model, params.replace(cold_stop_entropy=0.0), pad_id=0, eos_ids=[-1])
  out = dec([[3, 4, 5, 6], [7, 8, 9, 10, 11]], max_new_tokens=6, length_bucket=5)
  assert [o.tokens for o in out] == np.asarray(rec["token"]).tolist()


def test_logit_lens_shapes(tiny_model):
  rec = traces.logit_lens_trace(tiny_model, IDS, MASK, 0.6, steps=3)
  L = tiny_model.cfg.num_layers
  assert rec["overlap"].shape == (2, 3, L + 1, 2)
  ov = np.asarray(rec["overlap"])
  assert ov.min() >= 0 and ov.max() <= 1
  # alpha = 1: the mixture is t1 itself, its top-10 holds t1's top-5 at every layer.
  rec1 = traces.logit_lens_trace(tiny_model, IDS, MASK, 1.0, steps=2)
  np.testing.assert_allclose(np.asarray(rec1["overlap"])[..., 0], 1.0)


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
  from soft_evaluate_test import make_tiny_dir  # pylint: disable=import-outside-toplevel

  return make_tiny_dir(str(tmp_path_factory.mktemp("tiny_llama")))


def run_cli(tmp_path, *args, timeout=600) -> subprocess.CompletedProcess:
  return cli_util.run_module(PROG, tmp_path, *args, timeout=timeout)


@pytest.mark.parametrize(
  "name, extra",
  [
    ("js_probe", []),
    ("logit_lens", ["--lens_min_p2=0.0"]),
    ("rouge", ["--rouge_modes=soft,gumbel", "--n_samples=2"]),
    ("randomness", ["--gammas=1,4", "--taus=0.5,1", "--draws=2"]),
  ],
)
def test_cli_writes_files(tmp_path, tiny_dir, name, extra):
  out = tmp_path / "out"
  proc = run_cli(
    tmp_path,
    name,
    f"--model={tiny_dir}",
    "--prompt=w7 w8 w9",
    "--prompt=w20",
    "--steps=3",
    "--max_new_tokens=4",
    "--max_topk=4",
    "--top_k=20",
    "--after_top_k=20",
    f"--out={out}",
    *extra,
  )
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  for ext in ("csv", "json", "png"):
    assert (out / f"{name}.{ext}").stat().st_size > 0
  summary = json.loads((out / f"{name}.json").read_text())
  assert summary["analysis"] == name


def test_cli_unknown_analysis(tmp_path):
  proc = run_cli(tmp_path, "nope", f"--out={tmp_path}")
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0].startswith(f"{PROG}: error: ") and "js_probe" in lines[0]


ROUGE = ("rouge", "--prompt=w7 w8 w9", "--prompt=w20", "--max_new_tokens=4", "--max_topk=4")
ROUGE += ("--top_k=20", "--after_top_k=20", "--rouge_modes=soft,gumbel", "--n_samples=1")


def test_cli_out_file_is_refused_before_loading(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("keep")
  proc = run_cli(tmp_path, *ROUGE, "--model=/nonexistent", f"--out={afile}")
  cli_util.assert_usage_error(proc, PROG, "--out", afile, "not a directory")
  assert afile.read_text() == "keep"


def test_cli_ctrl_c_and_reruns(tmp_path, tiny_dir):
  """Ctrl-C (a real SIGINT) before the JSON is written: one line, exit 130, no result that looks
  complete; then a run, the same command again (kept, no file touched), other settings (refused in
  one line naming the field) and --overwrite (replaced)."""
  out = tmp_path / "out"
  args = (*ROUGE, f"--model={tiny_dir}", f"--out={out}")
  proc = cli_util.stop_after(PROG, tmp_path, "soft_jax.plots:rouge", *args).interrupt()
  assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines() == [
    f"{PROG}: interrupted; finished results are kept; rerun the same command to resume"
  ]
  assert (out / "rouge.png").exists() and not (out / "rouge.json").exists()

  first = run_cli(tmp_path, *args)
  assert first.returncode == 0, first.stderr
  before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
  again = run_cli(tmp_path, *args)
  assert again.returncode == 0 and "kept the complete rouge result" in again.stderr
  assert again.stdout == first.stdout
  assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
  cli_util.assert_usage_error(
    run_cli(tmp_path, *args, "--n_samples=2"),
    PROG,
    "rouge.json holds a complete result of another evaluation",
    "settings.n_samples: 1 there, 2 now",
  )
  proc = run_cli(tmp_path, *args, "--n_samples=2", "--overwrite")
  assert proc.returncode == 0, proc.stderr
  summary = json.loads((out / "rouge.json").read_text())
  assert summary["n_samples"] == 2 and summary["identity"]["settings"]["n_samples"] == 2
