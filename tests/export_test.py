"""Hugging Face checkpoints out: `codi_jax.export` on tiny LoRA runs (GPT-2, Llama) loads in
transformers with our logits; `--official` on its CODI layout reproduces our evaluation exactly."""
# pylint: disable=invalid-name

import dataclasses
import json
import os

import cli_util
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
from flax import nnx
from train_test import tiny_config

from codi_jax import eval_lib as ev
from codi_jax import export, final, train_lib
from codi_jax.codi import build, convert
from codi_jax.codi.model import Codi
from codi_jax.data import eval_sets, sources
from codi_jax.errors import InputError
from codi_jax.models import config as mcfg
from codi_jax.models import hf, transformer, weights_io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROG = "codi_jax.export"


@dataclasses.dataclass
class Exported:
  arch: str
  base: str  # the HF base the run started from
  workdir: str
  out: str
  config: object  # the run's config


def make_base(path, arch, config) -> str:
  """A small HF base: random weights (wide init, so greedy answers vary) and a BPE tokenizer of
  the task. GPT-2's table has exactly the tokenizer's rows; Llama's 13 more (a padded vocabulary,
  as Qwen2's) and a BOS token, as Llama-3's."""
  path.mkdir()
  recs, _, _ = sources.load_records(config)
  tok = build.build_tokenizer(config, recs)
  tok.backend.save(str(path / "tokenizer.json"))
  tok_cfg = {"eos_token": "<|endoftext|>"}
  n = tok.vocab_size
  common = dict(initializer_range=0.2, bos_token_id=0, eos_token_id=0)
  if arch == "gpt2":
    cfg = transformers.GPT2Config(
      vocab_size=n, n_positions=256, n_embd=32, n_layer=2, n_head=2, **common
    )
  else:
    tok_cfg.update(bos_token="<|endoftext|>", add_bos_token=True)
    cfg = transformers.LlamaConfig(
      vocab_size=n + 13,
      num_hidden_layers=2,
      max_position_embeddings=256,
      tie_word_embeddings=False,
      **tiny_hf.HF_SIZES,
      **common,
    )
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
  (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
  return str(path)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def exported(request, tmp_path_factory):
  """A 2-step LoRA run (f32) on a small HF base, exported (GPT-2 through the CLI)."""
  arch = request.param
  root = tmp_path_factory.mktemp(f"export_{arch}")
  c = tiny_config()
  c.model.spec = make_base(root / "base", arch, c)
  c.tokenizer = "model"
  c.model.lora_rank, c.model.lora_alpha, c.model.lora_dropout = 4, 8.0, 0.0
  c.optim.num_steps = 2
  c.eval.every_steps, c.eval.num_examples = 1000, 4
  c.checkpoint.every_steps = 1000
  c.data.buckets = 64  # one question bucket: one decoding compile per evaluation
  workdir, out = str(root / "run"), str(root / "hf")
  train_lib.train_and_evaluate(c, workdir)
  if arch == "gpt2":
    proc = cli_util.run_module(PROG, root, f"--workdir={workdir}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    assert f"-> {out}" in proc.stdout and "pad/bot/eot" in proc.stdout
  else:
    export.export(workdir, out)
  return Exported(arch, c.model.spec, workdir, out, c)


@pytest.mark.slow  # trains a tiny run per architecture (~1 minute of compiles)
def test_transformers_loads_the_export_with_our_logits(exported):
  run = final.load_final(exported.workdir)
  sp, cfg = run.special, run.codi.backbone.cfg
  params = nnx.to_flat_state(nnx.state(run.codi, nnx.LoRAParam))
  assert any(np.abs(np.asarray(v.get_value())).sum() > 0 for p, v in params if p[-1] == "lora_b")

  model = transformers.AutoModelForCausalLM.from_pretrained(
    exported.out, attn_implementation="eager"
  ).eval()
  assert model.config.vocab_size == cfg.vocab_size == sp.pad + 3
  assert model.config.pad_token_id == sp.pad
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 11))
  ids[:, 4], ids[:, 5], ids[:, 6] = sp.pad, sp.bot, sp.eot  # the trained table's special rows
  with torch.no_grad():
    want = model(torch.tensor(ids)).logits.numpy()
  pos = jnp.broadcast_to(jnp.arange(11), ids.shape)
  got = run.codi.backbone(jnp.asarray(ids), positions=pos).logits  # LoRA unmerged
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)

  # The merge changed the adapted weights (W + alpha/r * A @ B), and only those.
  exported_w = weights_io.read_safetensors(os.path.join(exported.out, "model.safetensors"))
  base_w = weights_io.read_hf_weights(exported.base)
  adapted = "transformer.h.0.attn.c_attn.weight" if exported.arch == "gpt2" else None
  adapted = adapted or "model.layers.0.self_attn.q_proj.weight"
  norm = "transformer.h.0.ln_1.weight" if exported.arch == "gpt2" else "model.norm.weight"
  assert not np.allclose(exported_w[adapted], base_w[adapted])
  np.testing.assert_array_equal(exported_w[norm], base_w[norm])

  tok = transformers.AutoTokenizer.from_pretrained(exported.out)
  assert len(tok) == cfg.vocab_size and tok.pad_token_id == sp.pad
  assert tok.convert_tokens_to_ids(["[PAD]", "<bot>", "<eot>"]) == [sp.pad, sp.bot, sp.eot]
  assert tok.eos_token_id == sp.eos
  q = "Tom has 3 apples and buys 4 more. How many apples?"
  assert tok(q).input_ids == run.tokenizer.encode(q, add_special_tokens=True)
  if exported.arch == "llama":
    assert tok(q).input_ids[0] == tok.bos_token_id == 0


@pytest.mark.slow  # trains a tiny run per architecture (~1 minute of compiles)
def test_official_on_the_export_reproduces_our_evaluation(exported, tmp_path):
  """Same parameters bit for bit through the CODI layout, and identical tokens per example."""
  run = final.load_final(exported.workdir)
  settings = json.loads(open(os.path.join(exported.out, "codi", "codi_config.json")).read())
  assert settings["special_ids"]["bot"] == run.special.bot and settings["lora_alpha"] == 8.0
  sd = weights_io.read_safetensors(os.path.join(exported.out, "codi", "model.safetensors"))
  assert {"prj.1.weight", "prj.3.bias", "prj.ln.weight"} <= set(sd)
  assert any(k.endswith(".base_layer.weight") for k in sd)
  assert any(k.endswith(".lora_A.default.weight") for k in sd)
  off = convert.load_official(os.path.join(exported.out, "codi"), exported.out)
  assert off.special == run.special
  ours = dict(nnx.to_flat_state(nnx.state(run.codi, nnx.Param)))
  theirs = dict(nnx.to_flat_state(nnx.state(off.codi, nnx.Param)))
  assert ours.keys() == theirs.keys()
  for k in ours:
    np.testing.assert_array_equal(
      np.asarray(theirs[k].get_value()), np.asarray(ours[k].get_value()), str(k)
    )

  data = eval_sets.load_eval_data("test", exported.config, limit=10)
  path = tmp_path / "questions.jsonl"
  path.write_text(
    "".join(
      json.dumps({"question": q, "answer": f"#### {g}"}) + "\n"
      for q, g in zip(data.questions, data.golds)
    )
  )
  common = dict(sets=[str(path)], limit=10, batch_size=5, max_new_tokens=8, progress=False)
  a = ev.evaluate(ev.Options(workdir=exported.workdir, out=str(tmp_path / "a"), **common))
  b = ev.evaluate(
    ev.Options(
      official=os.path.join(exported.out, "codi"),
      base=exported.out,
      out=str(tmp_path / "b"),
      **common,
    )
  )

  def tokens(d):
    return [json.loads(x)["tokens"] for x in (tmp_path / d / "questions.examples.jsonl").open()]

  assert tokens("a") == tokens("b") and len(tokens("a")) == 10
  assert len({tuple(t) for t in tokens("a")}) > 1  # the answers are not all the same
  ra, rb = a["results"][0], b["results"][0]
  for key in ("accuracy", "n", "generated_tokens", "thoughts", "padding_mode", "eos_ids"):
    assert ra[key] == rb[key], key


@pytest.mark.slow  # trains a tiny run per architecture (~1 minute of compiles)
def test_reference_module_loads_the_codi_layout_strictly(exported):
  """What the reference's test.py does with --ckpt_dir=<out>/codi on the original base: resize by
  3 rows, wrap in peft LoRA, add prj, load_state_dict. Strict here (the reference is not): every
  key matches; its logits equal ours."""
  peft = pytest.importorskip("peft")
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel

  run = final.load_final(exported.workdir)
  base = transformers.AutoModelForCausalLM.from_pretrained(
    exported.base, attn_implementation="eager"
  )
  base.resize_token_embeddings(base.config.vocab_size + 3)
  targets = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": mcfg.LORA_TARGETS["llama"]}
  lora = peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=list(targets[exported.arch]))
  module = torch.nn.Module()
  module.codi = peft.get_peft_model(base, lora)
  d = base.config.hidden_size
  module.prj = torch.nn.Sequential(
    torch.nn.Dropout(0.0), torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Linear(d, d)
  )
  module.prj.add_module("ln", torch.nn.LayerNorm(d))
  module.load_state_dict(load_file(os.path.join(exported.out, "codi", "model.safetensors")))
  module.eval()
  ids = np.random.default_rng(1).integers(0, run.codi.backbone.cfg.vocab_size, (2, 7))
  with torch.no_grad():
    want = module.codi(torch.tensor(ids)).logits.numpy()
    h = torch.tensor(np.random.default_rng(2).normal(size=(3, d)), dtype=torch.float32)
    want_prj = module.prj(h).numpy()
  got = run.codi.backbone(jnp.asarray(ids), positions=jnp.broadcast_to(jnp.arange(7), (2, 7)))
  np.testing.assert_allclose(np.asarray(got.logits), want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(
    np.asarray(run.codi.project(jnp.asarray(h.numpy()))), want_prj, atol=1e-5
  )


@pytest.mark.slow  # trains a tiny run per architecture (~1 minute of compiles)
def test_export_errors(exported, tmp_path):
  with pytest.raises(InputError, match="no such directory"):
    export.export(str(tmp_path / "missing"), str(tmp_path / "o"))
  (tmp_path / "w" / "final.tmp").mkdir(parents=True)
  with pytest.raises(InputError, match="unfinished run"):
    export.export(str(tmp_path / "w"), str(tmp_path / "o"))
  with pytest.raises(InputError, match="holds the run"):
    export.export(exported.workdir, os.path.dirname(exported.workdir), overwrite=True)
  if exported.arch == "gpt2":  # the CLI's one-line error, then --overwrite replaces the export
    proc = cli_util.run_module(
      PROG, tmp_path, f"--workdir={exported.workdir}", f"--out={exported.out}"
    )
    cli_util.assert_usage_error(proc, PROG, f"--out={exported.out}", "not empty", "--overwrite")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "stale.txt").write_text("x")
    with pytest.raises(InputError, match="is not an export"):  # not ours to replace
      export.export(exported.workdir, str(tmp_path / "o"), overwrite=True)
    assert os.listdir(tmp_path / "o") == ["stale.txt"]
    export.export(exported.workdir, str(tmp_path / "p"))
    (tmp_path / "p" / "stale.txt").write_text("x")  # a previous export: replaced whole
    export.export(exported.workdir, str(tmp_path / "p"), overwrite=True)
    assert not (tmp_path / "p" / "stale.txt").exists()
    assert (tmp_path / "p" / "codi" / "model.safetensors").is_file()


# ------------------------------------------------- no training: config writer, merge, Qwen2


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_config_writer_round_trips_and_merged_lora_loads(arch, tmp_path):
  """config_to_hf inverts config_from_hf (llama3 RoPE scaling included); merged LoRA weights
  written under HF names give transformers our logits (Qwen2: untied head, QKV bias)."""
  extra = {}
  if arch == "llama":
    extra = dict(rope_scaling=mcfg.RopeScaling("llama3", 8.0, 1.0, 4.0, 32), rope_theta=5e5)
  if arch == "qwen2":
    extra = dict(tie_embeddings=False, rope_theta=1e6)
  lora = mcfg.LoRAConfig(rank=4, alpha=8.0)
  cfg = mcfg.tiny(arch, vocab_size=67, lora=lora, **extra)
  model = transformer.build(cfg, seed=3)
  rng = np.random.default_rng(0)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if path[-1] == "lora_b":
      var.set_value(jnp.asarray(rng.normal(0, 0.2, var.get_value().shape), jnp.float32))
  # Trained pad/bot/eot rows live outside the table (train_special_embeddings): written in.
  Codi(model, rngs=nnx.Rngs(0), train_special_embeddings=True)
  model.embed.special.set_value(jnp.asarray(rng.normal(0, 1.0, (3, cfg.d_model)), jnp.float32))
  written = hf.config_to_hf(cfg, bos_token_id=None, eos_token_id=1, pad_token_id=None)
  assert hf.config_from_hf(written, lora=lora) == cfg
  (tmp_path / "config.json").write_text(json.dumps(written))
  tensors = {hf.full_name(k, arch): v for k, v in hf.export_tensors(model, merge_lora=True).items()}
  weights_io.write_safetensors(str(tmp_path / "model.safetensors"), tensors)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path), attn_implementation="eager"
  ).eval()
  ids = rng.integers(0, 67, (2, 10))
  ids[:, 3:6] = [64, 65, 66]
  np.testing.assert_array_equal(
    tensors[hf.full_name(hf.hf_name(("embed", "embedding"), arch)[0], arch)][-3:],
    np.asarray(model.embed.special[...]),
  )
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  got = model(jnp.asarray(ids), positions=jnp.broadcast_to(jnp.arange(10), (2, 10))).logits
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
