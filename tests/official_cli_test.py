"""Official CODI checkpoints in: a tiny PyTorch CODI (peft LoRA on GPT-2 / Llama, the reference
`prj`) saves its state dict in the reference's layout; `codi_jax.evaluate --official` reads it
(single file, sharded, torch .bin) and matches PyTorch's logits, losses and greedy answers."""
# pylint: disable=invalid-name

import copy
import dataclasses
import json
import os

import cli_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_codi
import tokenizers
from flax import nnx

from codi_jax import eval_lib as ev
from codi_jax.codi import convert
from codi_jax.codi.model import CodiOptions, codi_loss
from codi_jax.errors import InputError
from codi_jax.models import weights_io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROG = "codi_jax.evaluate"
V0, D = 77, 16  # base vocabulary (the checkpoint has V0 + 3 rows: pad, bot, eot), width
PAD, BOT, EOT = V0, V0 + 1, V0 + 2
N, R, ALPHA = 3, 8, 32.0  # thoughts; LoRA rank, and the reference scripts' alpha (the default)
TARGETS = {
  "gpt2": ["c_attn", "c_proj", "c_fc"],
  "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"],
}
WORDS = "Tom Ann has gives apples eggs and buys more away . How many are left ?".split()
QUESTIONS = [
  "Tom has 3 apples and buys 4 more . How many apples ?",
  "Ann has 12 eggs .",
  "Tom has 5 eggs and Ann gives 2 more . How many eggs are left ?",
  "How many apples ?",
  "Ann buys 7 apples and gives 3 away . How many are left ?",
]


@dataclasses.dataclass
class Case:
  arch: str
  base: str  # the base model's directory: config.json + tokenizer
  ckpts: dict  # format -> checkpoint directory
  ref: object  # torch module with .codi (peft model) and .prj, as the reference's CODI class
  eos: int


def write_base(path, arch) -> transformers.PretrainedConfig:
  """config.json + a word-level tokenizer of exactly V0 tokens (Llama: BOS added, as Llama-3's)."""
  vocab = ["<eos>", "<unk>", "<s>", *"0123456789", *WORDS]
  vocab += [f"w{i}" for i in range(V0 - len(vocab))]
  tok = tokenizers.Tokenizer(
    tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>")
  )
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
    [tokenizers.pre_tokenizers.Whitespace(), tokenizers.pre_tokenizers.Digits(True)]
  )
  tok.save(str(path / "tokenizer.json"))
  tok_cfg = {"eos_token": "<eos>", "unk_token": "<unk>"}
  if arch == "gpt2":
    cfg = transformers.GPT2Config(
      vocab_size=V0, n_positions=64, n_embd=D, n_layer=2, n_head=2, initializer_range=0.2
    )
  else:
    tok_cfg.update(bos_token="<s>", add_bos_token=True)
    cfg = transformers.LlamaConfig(
      vocab_size=V0,
      hidden_size=D,
      intermediate_size=32,
      num_hidden_layers=2,
      num_attention_heads=2,
      num_key_value_heads=1,
      max_position_embeddings=64,
      tie_word_embeddings=True,  # as Llama-3.2-1B
      initializer_range=0.2,
    )
  cfg.bos_token_id = cfg.eos_token_id = 0
  cfg.save_pretrained(path)
  (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
  return cfg


def reference_model(cfg, arch):
  """The reference's CODI module: resize by 3 rows, peft LoRA, prj (Dropout, Linear, GELU,
  Linear, LayerNorm); LoRA B and the LayerNorm moved off their identity initialisation."""
  torch.manual_seed(0)
  cfg._attn_implementation = "eager"  # pylint: disable=protected-access
  base = transformers.AutoModelForCausalLM.from_config(cfg)
  base.resize_token_embeddings(V0 + 3)
  lora = peft.LoraConfig(
    task_type=peft.TaskType.CAUSAL_LM,
    r=R,
    lora_alpha=ALPHA,
    lora_dropout=0.1,
    target_modules=TARGETS[arch],
    init_lora_weights=True,
  )
  module = torch.nn.Module()
  module.codi = peft.get_peft_model(base, lora)
  module.prj = torch.nn.Sequential(
    torch.nn.Dropout(0.0), torch.nn.Linear(D, D), torch.nn.GELU(), torch.nn.Linear(D, D)
  )
  module.prj.add_module("ln", torch.nn.LayerNorm(D))
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.05)
    module.prj.ln.weight.uniform_(0.5, 1.5)
    module.prj.ln.bias.normal_(0.0, 0.1)
  return module.eval()


def save_checkpoints(module, root) -> dict:
  """The state dict as model.safetensors, as two shards + index, and as pytorch_model.bin."""
  sd = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
  dirs = {fmt: root / fmt for fmt in ("single", "sharded", "bin")}
  for d in dirs.values():
    d.mkdir()
  weights_io.write_safetensors(str(dirs["single"] / "model.safetensors"), sd)
  keys = sorted(sd)
  shards = {
    "model-00001-of-00002.safetensors": keys[::2],
    "model-00002-of-00002.safetensors": keys[1::2],
  }
  for name, part in shards.items():
    weights_io.write_safetensors(str(dirs["sharded"] / name), {k: sd[k] for k in part})
  index = {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}
  (dirs["sharded"] / "model.safetensors.index.json").write_text(json.dumps(index))
  torch.save(module.state_dict(), dirs["bin"] / "pytorch_model.bin")
  return {k: str(v) for k, v in dirs.items()}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def case(request, tmp_path_factory):
  arch = request.param
  root = tmp_path_factory.mktemp(arch)
  (root / "base").mkdir()
  cfg = write_base(root / "base", arch)
  ref = reference_model(cfg, arch)
  keys = list(ref.state_dict())
  assert "prj.ln.weight" in keys and "prj.1.weight" in keys and "prj.3.bias" in keys
  assert any(k.startswith("codi.base_model.model.") and ".base_layer.weight" in k for k in keys)
  return Case(arch, str(root / "base"), save_checkpoints(ref, root), ref, eos=0)


# ------------------------------------------------------------------------------- PyTorch side


def reference_losses(module, b):
  """The official training forward (src/model.py) on an unpadded question batch: student CE,
  teacher CE, distillation (SmoothL1 / teacher std, averaged over every hidden state)."""
  codi, prj = module.codi, module.prj
  T = lambda k: torch.tensor(b[k])  # noqa: E731
  out = codi(
    input_ids=T("encoder_ids"),
    attention_mask=T("encoder_mask").long(),
    use_cache=True,
    output_hidden_states=True,
  )
  past, z = out.past_key_values, prj(out.hidden_states[-1][:, -1:, :])
  for _ in range(N):
    out = codi(inputs_embeds=z, past_key_values=past, use_cache=True, output_hidden_states=True)
    past, z = out.past_key_values, prj(out.hidden_states[-1][:, -1:, :])
  emb = codi.get_input_embeddings()(T("decoder_ids"))
  dec = codi(inputs_embeds=emb, past_key_values=past, output_hidden_states=True)
  tea = codi(
    input_ids=T("teacher_ids"), attention_mask=T("teacher_mask").long(), output_hidden_states=True
  )
  ce = torch.nn.CrossEntropyLoss(ignore_index=-100)
  width = dec.logits.shape[-1]
  ce_s = ce(dec.logits[:, :-1].reshape(-1, width), T("decoder_labels")[:, 1:].reshape(-1))
  ce_t = ce(tea.logits[:, :-1].reshape(-1, width), T("teacher_labels")[:, 1:].reshape(-1))
  rows = torch.arange(len(b["encoder_ids"]))
  kd = 0
  for hs, ht in zip(dec.hidden_states, tea.hidden_states):
    s, t = hs[rows, T("decoder_distill_index")], ht[rows, T("teacher_distill_index")]
    kd = kd + torch.nn.functional.smooth_l1_loss(s, t) / t.std()
  kd = kd / len(dec.hidden_states)
  return {"ce_student": ce_s, "ce_teacher": ce_t, "distill": kd, "loss": ce_s + kd + ce_t}


def reference_answer(module, ids, eos, max_new):
  """test.py's greedy loop for one question: [q][bot] -> N thoughts -> [eot] -> argmax over the
  first V + 2 logits (eot excluded) until eos."""
  codi, prj = module.codi, module.prj
  embed = codi.get_input_embeddings()
  with torch.no_grad():
    out = codi(input_ids=torch.tensor([ids + [BOT]]), use_cache=True, output_hidden_states=True)
    past, z = out.past_key_values, prj(out.hidden_states[-1][:, -1:, :])
    for _ in range(N):
      out = codi(inputs_embeds=z, past_key_values=past, use_cache=True, output_hidden_states=True)
      past, z = out.past_key_values, prj(out.hidden_states[-1][:, -1:, :])
    x, tokens = embed(torch.tensor([[EOT]])), []
    for _ in range(max_new):
      out = codi(inputs_embeds=x, past_key_values=past, use_cache=True)
      past = out.past_key_values
      t = int(out.logits[0, -1, : V0 + 2].argmax())
      tokens.append(t)
      if t == eos:
        break
      x = embed(torch.tensor([[t]]))
  return tokens


# -------------------------------------------------------------------------------------- tests


def test_every_format_loads_the_same_model_and_matches_pytorch(case):
  loaded = {fmt: convert.load_official(d, case.base) for fmt, d in case.ckpts.items()}
  flat = {fmt: nnx.to_flat_state(nnx.state(o.codi, nnx.Param)) for fmt, o in loaded.items()}
  for fmt in ("sharded", "bin"):
    for (path, a), (_, b) in zip(flat["single"], flat[fmt]):
      np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), str(path))
  off = loaded["sharded"]
  assert (off.special.pad, off.special.bot, off.special.eot, off.special.eos) == (PAD, BOT, EOT, 0)
  s = off.settings
  assert (s["lora_rank"], s["lora_alpha"], s["prj_dim"], s["use_prj"], s["prj_layernorm"]) == (
    R,
    ALPHA,
    D,
    True,
    True,
  )
  assert off.tokenizer.token_to_id("[PAD]") == PAD  # the tokenizer has no pad: [PAD] added at V

  ids = np.random.default_rng(1).integers(0, V0 + 3, (2, 9))
  with torch.no_grad():
    want = case.ref.codi(torch.tensor(ids)).logits.numpy()
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  got = off.codi.backbone(jnp.asarray(ids), positions=pos).logits
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)

  rng = np.random.default_rng(2)  # equal-length questions ending in bot; decoders start with eot
  b = tiny_codi.loss_batch(rng, V0, [6, 6, 6], [14, 10, 12], [11, 8, 9], bot=BOT, eot=EOT)
  opts = CodiOptions(num_latent=N)
  _, ours = jax.jit(codi_loss, static_argnums=2)(
    off.codi, {k: jnp.asarray(v) for k, v in b.items()}, opts
  )
  with torch.no_grad():
    theirs = reference_losses(case.ref, b)
  for k, v in theirs.items():
    np.testing.assert_allclose(float(ours[k]), float(v), atol=1e-4, rtol=0, err_msg=k)


def test_cli_answers_equal_the_reference_loop(case, tmp_path):
  """`--official` end to end on a local GSM8k-layout file: GPT-2 batched and masked (padded rows
  compute as alone), Llama at batch 1 in the reference's padding mode (the default)."""
  data = tmp_path / "test.jsonl"
  data.write_text(
    "".join(
      json.dumps({"question": q, "answer": f"#### {i}"}) + "\n" for i, q in enumerate(QUESTIONS)
    )
  )
  extra = ["--batch_size=2", "--padding_mode=masked"] if case.arch == "gpt2" else ["--batch_size=1"]
  out = tmp_path / "eval"
  proc = cli_util.run_module(
    PROG,
    tmp_path,
    f"--official={case.ckpts['sharded']}",
    f"--base={case.base}",
    "--sets=gsm8k",
    f"--set_path=gsm8k={data}",
    f"--num_latent={N}",
    "--max_new_tokens=6",
    "--mask_special=eot_only",
    f"--out={out}",
    *extra,
  )
  assert proc.returncode == 0, proc.stderr
  assert "gsm8k" in proc.stdout and "accuracy" in proc.stdout
  # Suffixes name what differs from the checkpoint's defaults (6 thoughts, official padding).
  stem = f"gsm8k.latent{N}" + (".masked" if case.arch == "gpt2" else "")
  summary = json.loads((out / f"{stem}.json").read_text())
  examples = [json.loads(x) for x in (out / f"{stem}.examples.jsonl").read_text().splitlines()]
  assert summary["n"] == len(examples) == len(QUESTIONS)
  assert summary["official"] == case.ckpts["sharded"] and summary["thoughts"] == N
  assert summary["generated_tokens"] == sum(e["n_tokens"] for e in examples)
  assert summary["scoring"].startswith("exact float equality")
  tok = convert.load_official(case.ckpts["single"], case.base).tokenizer
  for e, q in zip(examples, QUESTIONS):
    ids = tok.encode(q, add_special_tokens=True)
    assert case.arch != "llama" or ids[0] == 2  # Llama: BOS first
    assert e["tokens"] == reference_answer(case.ref, ids, case.eos, 6), q


def test_settings_errors(case):
  with pytest.raises(InputError, match=f"--lora_rank=4: .* has LoRA rank {R}"):
    convert.load_official(case.ckpts["single"], case.base, lora_rank=4)
  with pytest.raises(InputError, match="no such file or directory"):
    convert.load_official(case.ckpts["single"] + "/nope.safetensors", case.base)


def test_adapted_modules_are_read_off_the_checkpoint(case, tmp_path):
  """A checkpoint whose MLPs carry no LoRA (other target_modules) loads with attention-only
  adapters and equals the reference with its MLP adapters switched off."""
  sd = weights_io.read_safetensors(os.path.join(case.ckpts["single"], "model.safetensors"))
  mlp = {k for k in sd if ".mlp." in k and ".lora_" in k}
  kept = {
    k.replace(".base_layer.", ".") if ".mlp." in k else k: v for k, v in sd.items() if k not in mlp
  }
  weights_io.write_safetensors(str(tmp_path / "model.safetensors"), kept)
  off = convert.load_official(str(tmp_path), case.base)
  want_targets = (
    ["attn.c_attn", "attn.c_proj"]
    if case.arch == "gpt2"
    else [f"self_attn.{p}_proj" for p in "kovq"]
  )
  assert off.settings["lora_targets"] == sorted(want_targets)
  ref = copy.deepcopy(case.ref)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if ".mlp." in name and "lora_B" in name:
        p.zero_()
    ids = np.random.default_rng(3).integers(0, V0 + 3, (2, 8))
    want = ref.codi(torch.tensor(ids)).logits.numpy()
  got = off.codi.backbone(jnp.asarray(ids), positions=jnp.broadcast_to(jnp.arange(8), (2, 8)))
  np.testing.assert_allclose(np.asarray(got.logits), want, atol=1e-4, rtol=0)


def test_vocabulary_mismatch_names_both_sizes(tmp_path):
  base = tmp_path / "base"
  base.mkdir()
  write_base(base, "gpt2")
  cfg = json.loads((base / "config.json").read_text())
  cfg["vocab_size"] = V0 + 1
  (base / "config.json").write_text(json.dumps(cfg))
  sd = {"codi.base_model.model.transformer.wte.weight": np.zeros((V0 + 3, D), np.float32)}
  weights_io.write_safetensors(str(tmp_path / "model.safetensors"), sd)
  with pytest.raises(InputError, match=f"embedding has {V0 + 3} rows.*vocab_size {V0 + 1}"):
    convert.load_official(str(tmp_path / "model.safetensors"), str(base))


def test_usage_errors_are_one_line(tmp_path):
  proc = cli_util.run_module(PROG, tmp_path, f"--official={tmp_path}", "--sets=gsm8k")
  cli_util.assert_usage_error(proc, PROG, "--base", "required with --official")
  with pytest.raises(InputError, match="--lora_alpha: only with --official"):
    ev.Options(workdir=str(tmp_path), lora_alpha=16.0).check()
  with pytest.raises(InputError, match="either --workdir"):
    ev.Options(workdir=str(tmp_path), official=str(tmp_path), base=str(tmp_path)).check()
  with pytest.raises(InputError, match="--sets: required with --official"):
    ev.Options(official=str(tmp_path), base=str(tmp_path)).check()
  with pytest.raises(InputError, match="svamp is not in --sets"):
    ev.Options(workdir=str(tmp_path), sets=["gsm8k"], set_path=["svamp=/x.json"]).check()


def test_read_only_checkpoint_dir_is_refused_before_loading(case, tmp_path):
  """--official=DIR on a read-only DIR (downloaded checkpoints often are) and no --out: its
  default output DIR/eval cannot be created: one line naming it and --out, before the sets are read
  or the model loaded (the missing set file would be the error otherwise)."""
  ckpt = case.ckpts["sharded"]
  proc = cli_util.run_module(
    PROG,
    tmp_path,
    f"--official={ckpt}",
    f"--base={case.base}",
    "--sets=gsm8k",
    f"--set_path=gsm8k={tmp_path / 'missing.jsonl'}",
    read_only=[ckpt],
  )
  cli_util.assert_usage_error(
    proc, PROG, os.path.join(ckpt, "eval"), "cannot create the directory", "pass --out="
  )
  assert not os.path.exists(os.path.join(ckpt, "eval"))
