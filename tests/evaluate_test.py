"""`python -m codi_jax.evaluate` on tiny saved runs: files, counts, batch invariance, compiles."""

import json
import os

import cli_util
import numpy as np
import pytest
import shared_data
from flax import nnx
from train_test import tiny_config

from codi_jax import eval_lib as ev
from codi_jax import eval_runner, final, results
from codi_jax.codi import build
from codi_jax.data import eval_sets, sources
from codi_jax.errors import InputError

PROG = "codi_jax.evaluate"


def _save_run(workdir, method):
  """A tiny untrained run saved as training saves one (the plumbing is tested, not accuracy)."""
  c = tiny_config(method)
  c.data.buckets = 160  # every synthetic question in one bucket: one compile per test
  c.data.synthetic.test = 24
  c.eval.batch_size = 8
  # The toy BPE spends up to ~600 tokens on a real GSM8k/GSM-Hard question: room for them, since
  # a prompt past the learned positions is refused before decoding.
  c.model.max_positions = 1024
  train, _, _ = sources.load_records(c)
  codi, tok, special = build.build_model(c, build.build_tokenizer(c, train))
  final.save_final(str(workdir), nnx.state(codi, nnx.Param), c, tok, special, {"steps": 0})
  return str(workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  return {m: _save_run(root / m, m) for m in ("codi", "cot_sft")}


@pytest.fixture(scope="module")
def finals(runs):
  return {m: final.load_final(w) for m, w in runs.items()}


def run_cli(tmp_path, *args):
  return cli_util.run_module(PROG, tmp_path, *args)


def assert_one_line_error(proc, *needles):
  cli_util.assert_usage_error(proc, PROG, *needles)


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_cli_end_to_end_with_efficiency_and_probe(runs, tmp_path):
  out = tmp_path / "eval"
  proc = run_cli(
    tmp_path,
    f"--workdir={runs['codi']}",
    f"--cot_workdir={runs['cot_sft']}",
    "--limit=6",
    "--batch_size=4",
    "--probe",
    "--probe_all",
    "--latency_calls=2",
    f"--out={out}",
  )
  assert proc.returncode == 0, proc.stderr
  assert "synthetic_test" in proc.stdout and "compression" in proc.stdout  # the printed tables
  summary = json.loads((out / "synthetic_test.json").read_text())
  examples = read_jsonl(out / "synthetic_test.examples.jsonl")
  assert summary["n"] == len(examples) == 6
  assert [e["index"] for e in examples] == list(range(6))
  assert summary["correct"] == sum(e["correct"] for e in examples)
  assert summary["accuracy"] == pytest.approx(np.mean([e["correct"] for e in examples]))
  assert summary["mean_generated_tokens"] == pytest.approx(
    np.mean([e["n_tokens"] for e in examples])
  )
  assert all(len(e["tokens"]) == e["n_tokens"] for e in examples)
  assert summary["mode"] == "student" and summary["thoughts"] == 2
  assert summary["compiles"] == len(summary["buckets"]) == 1

  eff = json.loads((out / "synthetic_test.efficiency.json").read_text())
  codi, cot = eff["codi"], eff["cot_sft"]
  assert codi["thoughts"] == 2 and cot["thoughts"] == 0 and cot["mode"] == "teacher"
  assert codi["tokens_per_problem"] == pytest.approx(2 + summary["mean_generated_tokens"])
  assert eff["compression_paper"] == pytest.approx(cot["mean_generated_tokens"] / 4)
  assert eff["compression_tokens"] == pytest.approx(
    cot["tokens_per_problem"] / codi["tokens_per_problem"]
  )
  for m in (codi, cot):
    for name, bs in (("batch1", 1), ("batched", 4)):
      lat = m["latency"][name]
      assert lat["batch_size"] == bs and lat["calls"] == 2 and lat["per_problem_s"] > 0
      assert lat["per_problem_s"] == pytest.approx(lat["median_call_s"] / bs)
  assert eff["speedup"]["batch1"] == pytest.approx(
    cot["latency"]["batch1"]["per_problem_s"] / codi["latency"]["batch1"]["per_problem_s"]
  )

  probe = json.loads((out / "synthetic_test.probe.json").read_text())
  assert len(probe["examples"]) == 6 and probe["top_k"] == 5 and probe["source"] == "pre_prj"
  first = probe["examples"][0]
  assert len(first["tokens"]) == 3 and all(len(t) == 5 for t in first["tokens"])  # bot + 2 thoughts
  assert all(np.all(np.diff(p) <= 0) for p in first["probs"])  # most likely first
  assert len(first["results"]) == len(first["found"]) == len(first["cot"].split())
  assert (
    probe["table3"]["steps"][0]["problems"] == 6 and summary["probe"]["table3"] == probe["table3"]
  )
  text = (out / "synthetic_test.probe.txt").read_text()
  assert text.count("\nproblem ") == 6 and "after thought 2:" in text
  assert not [f for f in os.listdir(out) if ".tmp" in f]  # atomic writes leave no temporaries


@pytest.mark.parametrize("method,mode", [("codi", "student"), ("cot_sft", "teacher")])
def test_batched_equals_batch_one(finals, method, mode):
  data = eval_sets.load_eval_data("test", finals[method].config, limit=6)
  runner = eval_runner.Runner(finals[method], mode, max_new_tokens=6)
  _, batched, _ = runner.run(data, 4, progress=False)
  _, single, _ = runner.run(data, 1, progress=False)
  assert [e["tokens"] for e in batched] == [e["tokens"] for e in single]
  assert [e["prediction"] for e in batched] == [e["prediction"] for e in single]


def test_one_compile_per_bucket(finals):
  run = final.FinishedRun(
    **{**vars(finals["codi"]), "config": finals["codi"].config.copy_and_resolve_references()}
  )
  run.config.data.buckets = 16
  short, long_ = "Tom has 3 apples.", "Tom has 3 apples and buys 4 more. " * 3 + "How many?"
  data = eval_sets.EvalData(
    "mixed",
    "math",
    [short, long_, short, long_, short],
    [3.0, 7.0, 3.0, 7.0, 3.0],
    [[]] * 5,
    [None] * 5,
    {"source": "test"},
  )
  runner = eval_runner.Runner(run, "student", max_new_tokens=4)
  summary, examples, _ = runner.run(data, 2, progress=False)
  assert len(summary["buckets"]) == 2 and summary["compiles"] == 2
  assert [e["index"] for e in examples] == [0, 1, 2, 3, 4]
  assert (
    examples[0]["tokens"] == examples[2]["tokens"] == examples[4]["tokens"]
  )  # same question, any batch
  again, _, _ = runner.run(data, 2, progress=False)
  assert again["compiles"] == 0


def test_missing_final_is_a_one_line_error(tmp_path):
  proc = run_cli(tmp_path, f"--workdir={tmp_path}")
  assert_one_line_error(proc, str(tmp_path), "no finished run")
  (tmp_path / "final.tmp").mkdir()
  with pytest.raises(InputError, match="unfinished run"):
    final.load_final(str(tmp_path))
  (tmp_path / "final").mkdir()
  with pytest.raises(InputError, match="incomplete checkpoint"):
    final.load_final(str(tmp_path))


def test_malformed_data_line_names_file_and_line(runs, tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"question": "Tom has 2 apples.", "answer": "2"}\n{"question": oops}\n')
  proc = run_cli(tmp_path, f"--workdir={runs['codi']}", f"--sets={path}")
  assert_one_line_error(proc, str(path), "line 2")
  assert not os.path.exists(os.path.join(runs["codi"], "eval", "bad.json"))


def test_set_specs(finals, tmp_path):
  config = finals["codi"].config
  path = tmp_path / "gsm.jsonl"
  rows = [
    {"question": " Q1  here ", "answer": "She sold 48/2 = <<48/2=24>>24.\n#### 24"},
    {"question": "Q2", "answer": "#### 1,000"},
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  plain = eval_sets.load_eval_data(str(path), config, steps=True)
  assert (plain.name, plain.task, plain.golds, plain.steps) == (
    "gsm",
    "math",
    [24.0, 1000.0],
    [[24.0], []],
  )
  assert plain.questions == ["Q1 here", "Q2"]
  named = eval_sets.load_eval_data("gsm8k", config, limit=1, paths={"gsm8k": str(path)})
  assert (named.name, named.golds, named.steps) == ("gsm8k", [24.0], [[]])  # steps if probing
  assert named.report["used"] == 1 and named.report["read"] == 2
  with pytest.raises(InputError, match=f"{path}: no usable rows for gsm_hard .*field 'input'"):
    eval_sets.load_eval_data("gsm-hard", None, paths={"gsm_hard": str(path)})  # GSM8k's layout
  (tmp_path / "gsm8k").mkdir()
  (tmp_path / "gsm8k" / "test.jsonl").write_text(path.read_text())
  from_dir = eval_sets.load_eval_data("gsm8k", None, data_dir=str(tmp_path), steps=True)
  assert from_dir.golds == [24.0, 1000.0] and from_dir.steps == [[24.0], []]
  syn = eval_sets.load_eval_data("synthetic:valid", config, limit=3)
  assert syn.name == "synthetic_valid" and len(syn.questions) == 3 and all(syn.steps)
  with pytest.raises(InputError, match="not a .json/.jsonl file"):
    eval_sets.load_eval_data("nope", config)
  with pytest.raises(InputError, match="no hub copy; pass --data_dir"):
    eval_sets.load_eval_data("gsm8k_aug_test", config)
  with pytest.raises(InputError, match="official checkpoint has none"):
    eval_sets.load_eval_data("test", None)
  with pytest.raises(InputError, match="no such file"):
    eval_sets.load_eval_data("svamp", config, data_dir=str(tmp_path))


def test_scoring_report_counts_non_integer_golds_and_near_misses():
  golds = [14053029.666666666, 3.0, 5.5, 7.0]
  examples = [
    {"correct": False, "extracted": 14053029.67},  # the gold written to 2 decimals: wrong
    {"correct": True, "extracted": 3.0},
    {"correct": False, "extracted": 5.4},
    {"correct": False, "extracted": None},  # no number in the answer
  ]
  rep = eval_runner._scoring_report(examples, golds)  # pylint: disable=protected-access
  assert (rep["non_integer_golds"], rep["near_misses"]) == (2, 1)
  assert rep["scoring"].startswith("exact float equality")


def test_real_sets_from_data_dir_and_set_path(runs, tmp_path):
  """The four public sets from their authors' files: one table, per-set n, tokens and seconds,
  GSM-Hard's non-integer golds reported (scored exactly, as the reference)."""
  shared_data.path("gsm_hard", "gsmhardv2.jsonl")  # skips (or fails in CI) without the data
  out = tmp_path / "eval"
  proc = run_cli(
    tmp_path,
    f"--workdir={runs['codi']}",
    "--sets=gsm8k,svamp,gsm-hard,multiarith",
    f"--data_dir={shared_data.DATA_ROOT}",
    f"--set_path=svamp={shared_data.path('svamp', 'SVAMP.json')}",
    "--limit=8",
    "--batch_size=8",
    "--max_new_tokens=2",
    f"--out={out}",
  )
  assert proc.returncode == 0, proc.stderr
  for name, read in (("gsm8k", 1319), ("svamp", 1000), ("gsm_hard", 1319), ("multiarith", 600)):
    assert name in proc.stdout
    s = json.loads((out / f"{name}.json").read_text())
    assert s["n"] == 8 and s["reader"]["used"] == 8 and s["reader"]["read"] >= read - 1
    assert s["generated_tokens"] > 0 and s["eval_seconds"] > 0
    assert s["scoring"].startswith("exact float equality")
  hard = json.loads((out / "gsm_hard.json").read_text())
  assert hard["non_integer_golds"] == 1  # row 7 of gsmhardv2.jsonl: 14053029.666666666
  assert "gsm_hard (student): 1 of 8 golds are not integers" in proc.stdout


def test_cli_flag_errors(runs, tmp_path):
  proc = run_cli(tmp_path, f"--workdir={runs['codi']}", "--set_path=gsm8k")
  assert_one_line_error(proc, "--set_path=gsm8k", "NAME=FILE")
  proc = run_cli(tmp_path, f"--workdir={runs['codi']}", "--sets=svamp", f"--data_dir={tmp_path}")
  assert_one_line_error(proc, "svamp/SVAMP.json", "no such file")


# -------------------------------------------- interruptions, reruns and unusable output locations

RESUME_ARGS = ("--limit=6", "--batch_size=2", "--max_new_tokens=4", "--probe", "--probe_all")
STEM = "synthetic_test"


def _opts(runs, out, **kw):
  kw = {"limit": 6, "batch_size": 2, "max_new_tokens": 4, **kw}
  return ev.Options(workdir=runs["codi"], out=str(out), progress=False, **kw)


def _files(out):
  return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _forbid(monkeypatch, *names):
  """Makes each eval_lib function in `names` fail the test if called (counts work: none done)."""
  for name in names:

    def fail(*args, _name=name, **kwargs):
      raise AssertionError(f"{_name} called")

    monkeypatch.setattr(ev, name, fail)


def test_out_file_is_refused_before_any_work(runs, tmp_path, monkeypatch):
  """--out=<an existing file>: one line, exit 2, before any set is read or model loaded (the
  missing set file would otherwise be the error); the file is untouched."""
  afile = tmp_path / "afile"
  afile.write_text("keep")
  missing = tmp_path / "missing.jsonl"
  proc = run_cli(tmp_path, f"--workdir={runs['codi']}", f"--sets={missing}", f"--out={afile}")
  assert_one_line_error(proc, "--out", str(afile), "not a directory")
  assert afile.read_text() == "keep"
  _forbid(monkeypatch, "load_eval_data", "load_final", "Runner")
  cli_util.raises_one_line(lambda: ev.evaluate(_opts(runs, afile)), str(afile), "not a directory")
  cli_util.raises_one_line(lambda: ev.evaluate(_opts(runs, afile / "x")), "cannot create")


def test_read_only_out_is_refused_before_any_work(runs, tmp_path):
  """--out on a read-only filesystem (or directory), and the default <workdir>/eval of a read-only
  run (a downloaded one): one line naming the directory, before anything is read or decoded."""
  ro = tmp_path / "ro"
  ro.mkdir()
  missing = f"--sets={tmp_path / 'missing.jsonl'}"
  proc = cli_util.run_module(
    PROG, tmp_path, f"--workdir={runs['codi']}", missing, f"--out={ro / 'eval'}", read_only=[ro]
  )
  assert_one_line_error(proc, "--out", str(ro / "eval"), "cannot create the directory")
  proc = cli_util.run_module(
    PROG, tmp_path, f"--workdir={runs['codi']}", missing, f"--out={ro}", read_only=[ro]
  )
  assert_one_line_error(proc, "--out", str(ro), "not writable")
  proc = cli_util.run_module(
    PROG, tmp_path, f"--workdir={runs['codi']}", missing, read_only=[runs["codi"]]
  )
  assert_one_line_error(proc, os.path.join(runs["codi"], "eval"), "pass --out=")
  assert not os.listdir(ro)


def test_killed_evaluation_resumes_to_the_uninterrupted_results(runs, tmp_path):
  """SIGKILL once the first batch's records are on disk, then the same command: it decodes only
  the rest and writes exactly what an uninterrupted run writes (examples, probe, summary)."""
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  args = (f"--workdir={runs['codi']}", *RESUME_ARGS)
  proc = run_cli(tmp_path, *args, f"--out={whole}")
  assert proc.returncode == 0, proc.stderr
  stopped = cli_util.stop_after(
    PROG, tmp_path, "codi_jax.results:Journal._write", *args, f"--out={cut}"
  )
  partial = cut / f"{STEM}.partial.jsonl"
  lines = [json.loads(x) for x in partial.read_text().splitlines()]
  assert "identity" in lines[0] and [x["key"] for x in lines[1:]] == [0, 1]  # the first batch
  killed = stopped.kill()
  assert killed.returncode == -9 and not (cut / f"{STEM}.json").exists()

  proc = run_cli(tmp_path, *args, f"--out={cut}")
  assert proc.returncode == 0, proc.stderr
  assert f"{STEM}: resuming after 2 of 6 problems" in proc.stderr
  assert not partial.exists()
  for name in (".examples.jsonl", ".probe.json", ".probe.txt"):
    assert (cut / f"{STEM}{name}").read_text() == (whole / f"{STEM}{name}").read_text(), name
  a, b = (json.loads((d / f"{STEM}.json").read_text()) for d in (whole, cut))
  assert a["compiles"] == 1 and b["compiles"] == 2  # one per session
  for s in (a, b):
    del s["eval_seconds"], s["compiles"]  # measured: they add up over the sessions
  assert a == b


def test_ctrl_c_keeps_finished_batches_and_a_rerun_resumes_them(runs, tmp_path, monkeypatch):
  """Ctrl-C after the first batch: Interrupted naming how far it got and where (the CLI prints it
  and exits 130); a rerun with other settings is refused naming the field; the same settings
  decode only the remaining batches."""
  batches, interrupt = [], [True]
  append = results.Journal.append

  def counted(self, items, **kwargs):  # Ctrl-C right after the first batch is recorded
    items = list(items)
    append(self, items, **kwargs)
    batches.append(len(items))
    if interrupt.pop() if interrupt else False:
      raise KeyboardInterrupt

  monkeypatch.setattr(results.Journal, "append", counted)
  out = tmp_path / "ev"
  with pytest.raises(results.Interrupted) as info:
    ev.evaluate(_opts(runs, out))
  assert str(info.value) == (
    f"interrupted after 2 of 6 problems of {STEM} (student); partial results in {out}; rerun the "
    "same command to resume"
  )
  cli_util.raises_one_line(
    lambda: ev.evaluate(_opts(runs, out, max_new_tokens=5)),
    f"{STEM}.partial.jsonl",
    "settings.max_new_tokens: 4 there, 5 now",
  )
  whole = ev.evaluate(_opts(runs, tmp_path / "whole"))["results"][0]
  batches.clear()
  resumed = ev.evaluate(_opts(runs, out))["results"][0]
  assert batches == [2, 2]  # the first batch was not decoded again
  assert read_jsonl(out / f"{STEM}.examples.jsonl") == read_jsonl(
    tmp_path / "whole" / f"{STEM}.examples.jsonl"
  )
  for s in (whole, resumed):
    del s["eval_seconds"], s["compiles"]
  assert resumed == whole


def test_rerun_keeps_a_complete_result_and_replaces_it_only_with_overwrite(
  runs, tmp_path, monkeypatch
):
  out = tmp_path / "ev"
  first = ev.evaluate(_opts(runs, out))["results"]
  before = _files(out)
  with monkeypatch.context() as m:
    m.setattr(eval_runner.Runner, "run", _unused)  # nothing is decoded below
    assert ev.evaluate(_opts(runs, out))["results"] == first  # the same command: kept
    cli_util.raises_one_line(
      lambda: ev.evaluate(_opts(runs, out, max_new_tokens=5)),
      f"{STEM}.json holds a complete result of another evaluation",
      "settings.max_new_tokens: 4 there, 5 now",
      "--overwrite",
    )
  assert _files(out) == before  # neither touched a file
  again = ev.evaluate(_opts(runs, out, max_new_tokens=5, overwrite=True))["results"][0]
  assert again["max_new_tokens"] == 5 and again["identity"]["settings"]["max_new_tokens"] == 5
  assert json.loads((out / f"{STEM}.json").read_text()) == again
  assert sorted(_files(out)) == sorted(before)  # the same files, replaced


def _unused(*args, **kwargs):
  raise AssertionError("decoded a result that was complete")
