"""CODI loss against an independent PyTorch reference (HF transformers), and gradient flow."""
# pylint: disable=invalid-name

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_codi
import tiny_hf
from flax import nnx

from codi_jax.codi.model import (
  Codi,
  CodiOptions,
  codi_loss,
  encode_and_think,
  masked_ce,
  student_forward,
  teacher_label_window,
)
from codi_jax.data import codi_batches as cb
from codi_jax.models import config as mcfg
from codi_jax.models import hf, transformer
from codi_jax.models.params import split_trainable

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, N = 80, 3


def hf_model(arch, init=0.02):
  """A tiny random HF model with eager attention; `init`: the weights' std (larger: sharper
  attention, so a padded row's real scores differ from uniform)."""
  torch.manual_seed(0)
  if arch == "gpt2":
    c = transformers.GPT2Config(
      vocab_size=V,
      n_positions=64,
      n_embd=32,
      n_layer=2,
      n_head=4,
      embd_pdrop=0.0,
      attn_pdrop=0.0,
      resid_pdrop=0.0,
      initializer_range=init,
    )
  else:
    c = transformers.LlamaConfig(
      vocab_size=V,
      num_hidden_layers=2,
      max_position_embeddings=64,
      initializer_range=init,
      **tiny_hf.HF_SIZES,
    )
  c._attn_implementation = "eager"  # pylint: disable=protected-access
  return transformers.AutoModelForCausalLM.from_config(c).eval()


def make_batch(rng):
  """Equal-length questions (the reference's unmasked passes differ only on padded rows) and
  right-padded decoder/teacher rows of different lengths."""
  return tiny_codi.loss_batch(rng, V, [6, 6, 6], [14, 10, 12], [11, 8, 9])


def cuda_encoder_bias(mask_BxL):
  """The encoder pass's attention bias [B, 1, L, L] (0: attend, float32 min: masked) as PyTorch
  SDPA applies it on CUDA (transformers' `_unmask_unattended`): causal and padding, except that a
  query that sees no key (a left pad) is un-masked and attends to every key with its real scores.
  Eager attention (the model's own from the 2D mask) instead swamps that row's scores with the
  min, so the pad attends uniformly."""
  m = torch.tensor(mask_BxL, dtype=torch.bool)
  L = m.shape[1]
  allowed = torch.tril(torch.ones(L, L, dtype=torch.bool))[None] & m[:, None, :]
  allowed = allowed | ~allowed.any(-1, keepdim=True)
  return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def torch_student(model, prj, b, pads="cuda"):
  """The reference student path: encode the question, N thoughts through `prj` on the cache, then
  the teacher-forced decoder; returns the decoder's output (with hidden states). `pads`: how a
  fully padded query row attends in the encoder pass, as on CUDA (`cuda_encoder_bias`) or eager."""
  mask = b["encoder_mask"]
  out = model(
    input_ids=torch.tensor(b["encoder_ids"]),
    attention_mask=cuda_encoder_bias(mask) if pads == "cuda" else torch.tensor(mask).long(),
    use_cache=True,
    output_hidden_states=True,
  )
  past = out.past_key_values
  z = prj(out.hidden_states[-1][:, -1:, :])
  for _ in range(N):
    out = model(inputs_embeds=z, past_key_values=past, use_cache=True, output_hidden_states=True)
    past = out.past_key_values
    z = prj(out.hidden_states[-1][:, -1:, :])
  return model(
    inputs_embeds=model.get_input_embeddings()(torch.tensor(b["decoder_ids"])),
    past_key_values=past,
    output_hidden_states=True,
  )


def torch_reference(model, prj, b, beta, gamma, pads="cuda"):
  """The official CODI forward (zhenyi4/codi src/model.py), re-written from the spec in PyTorch,
  with fully padded query rows as on CUDA (or `pads="eager"`; see `torch_student`)."""
  T = lambda k: torch.tensor(b[k])  # noqa: E731
  dec = torch_student(model, prj, b, pads)
  ce = torch.nn.CrossEntropyLoss(ignore_index=-100)
  ce_s = ce(dec.logits[:, :-1].reshape(-1, V), T("decoder_labels")[:, 1:].reshape(-1))
  tea = model(
    input_ids=T("teacher_ids"), attention_mask=T("teacher_mask").long(), output_hidden_states=True
  )
  ce_t = ce(tea.logits[:, :-1].reshape(-1, V), T("teacher_labels")[:, 1:].reshape(-1))
  rows = torch.arange(len(b["encoder_ids"]))
  kd = 0
  for hs, ht in zip(dec.hidden_states, tea.hidden_states):
    s, t = hs[rows, T("decoder_distill_index")], ht[rows, T("teacher_distill_index")].detach()
    kd = kd + torch.nn.functional.smooth_l1_loss(s, t) / t.std()
  kd = kd / len(dec.hidden_states)
  return ce_s, ce_t, kd, ce_s + beta * kd + gamma * ce_t


def torch_prj(codi):
  """The reference `prj` (Linear -> GELU -> Linear -> LayerNorm) carrying our projection's weights."""
  p = codi.prj
  d, h = p.w1.shape
  seq = torch.nn.Sequential(
    torch.nn.Linear(d, h), torch.nn.GELU(), torch.nn.Linear(h, d), torch.nn.LayerNorm(d)
  )
  with torch.no_grad():
    seq[0].weight.copy_(torch.tensor(np.asarray(p.w1[...]).T))
    seq[0].bias.copy_(torch.tensor(np.asarray(p.b1[...])))
    seq[2].weight.copy_(torch.tensor(np.asarray(p.w2[...]).T))
    seq[2].bias.copy_(torch.tensor(np.asarray(p.b2[...])))
    seq[3].weight.copy_(torch.tensor(np.asarray(p.ln.scale[...])))
    seq[3].bias.copy_(torch.tensor(np.asarray(p.ln.bias[...])))
  return seq


def assert_matches_reference(m, ref, codi, b, atol=1e-4):
  """Our loss terms `m` equal the PyTorch reference's (CUDA's padded rows) on batch `b`."""
  with torch.no_grad():
    ce_s, ce_t, kd, total = torch_reference(ref, torch_prj(codi), b, beta=2.0, gamma=0.5)
  for key, theirs in [("ce_student", ce_s), ("ce_teacher", ce_t), ("distill", kd), ("loss", total)]:
    np.testing.assert_allclose(float(m[key]), float(theirs), atol=atol, rtol=0, err_msg=key)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("padding_mode", ["masked", "official"])
def test_loss_matches_pytorch_reference(arch, padding_mode):
  ref = hf_model(arch)
  cfg = hf.config_from_hf(ref.config.to_dict())
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  codi = Codi(hf.assign(cfg, sd, where=arch), rngs=nnx.Rngs(0))
  opts = CodiOptions(num_latent=N, beta=2.0, gamma=0.5, padding_mode=padding_mode)
  b = make_batch(np.random.default_rng(0))
  _, m = jax.jit(codi_loss, static_argnums=2)(codi, {k: jnp.asarray(v) for k, v in b.items()}, opts)
  assert_matches_reference(m, ref, codi, b)


def padded_batch(rng, width, lens=(6, 4, 5)):
  """make_batch with left-padded questions of `lens` in a `width`-slot bucket (the longest is the
  batch maximum: the reference collator pads to it; a wider bucket adds slots it never has)."""
  b = make_batch(rng)
  ids = rng.integers(0, V, (len(lens), max(lens)))
  enc = np.zeros((len(lens), width), np.int64)
  mask = np.arange(width)[None] >= width - np.array(lens)[:, None]
  for i, n in enumerate(lens):
    enc[i, width - n :] = ids[i, :n]
  b["encoder_ids"], b["encoder_mask"] = enc, mask
  return b


def _ours(arch, padding_mode, batch, init=0.02):
  ref = hf_model(arch, init)
  cfg = hf.config_from_hf(ref.config.to_dict())
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  codi = Codi(hf.assign(cfg, sd, where=arch), rngs=nnx.Rngs(0))
  opts = CodiOptions(num_latent=N, beta=2.0, gamma=0.5, padding_mode=padding_mode)
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  _, m = jax.jit(codi_loss, static_argnums=2)(codi, b, opts)
  return ref, codi, m


# Rows with 10 and 8 left pads, and weights large enough for sharp attention: a fully padded
# query row's real scores (CUDA SDPA) then differ from uniform (eager) by far more than PADDED_TOL.
PADDED_LENS, PADDED_INIT, PADDED_TOL = (12, 2, 4), 0.1, 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("width", [12, 15])
def test_padded_official_mode_matches_pytorch_reference_on_cuda(arch, width):
  """Official mode on left-padded questions equals the reference as it runs on CUDA (a left pad
  that sees no key attends with its real scores) on the same batch padded to its maximum, also
  when our bucket is wider than that maximum; the reference under eager attention (such a pad
  attends uniformly) differs by more than 10x the tolerance, so the test tells them apart."""
  batch = padded_batch(np.random.default_rng(5), width, PADDED_LENS)
  ref, codi, m = _ours(arch, "official", batch, PADDED_INIT)
  b = padded_batch(np.random.default_rng(5), max(PADDED_LENS), PADDED_LENS)  # the collator's
  assert_matches_reference(m, ref, codi, b, atol=PADDED_TOL)
  with torch.no_grad():
    cuda = torch_reference(ref, torch_prj(codi), b, 2.0, 0.5)
    eager = torch_reference(ref, torch_prj(codi), b, 2.0, 0.5, pads="eager")
  assert max(abs(float(x) - float(y)) for x, y in zip(cuda, eager)) > 10 * PADDED_TOL


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padded_masked_mode_equals_each_row_alone(arch):
  """Masked mode (ours) makes a padded row compute what it computes alone: each row's student
  logits equal the reference run on that row without padding; official mode does not (the
  documented difference: the reference's latent and answer passes attend to question pads)."""
  b = padded_batch(np.random.default_rng(6), 9)
  ref, codi, _ = _ours(arch, "masked", b)
  jb = {k: jnp.asarray(v) for k, v in b.items()}
  logits = {
    mode: np.asarray(student_forward(codi, jb, CodiOptions(num_latent=N, padding_mode=mode)).logits)
    for mode in ("masked", "official")
  }
  differs = False
  for i, n in enumerate([6, 4, 5]):
    row = {k: v[i : i + 1] for k, v in b.items()}
    row["encoder_ids"], row["encoder_mask"] = (
      row["encoder_ids"][:, -n:],
      row["encoder_mask"][:, -n:],
    )
    with torch.no_grad():
      want = torch_student_logits(ref, torch_prj(codi), row)
    real = b["decoder_mask"][i]
    np.testing.assert_allclose(logits["masked"][i][real], want[0][real], atol=1e-4, rtol=0)
    differs |= not np.allclose(logits["official"][i][real], want[0][real], atol=1e-3)
  assert differs  # the shorter rows see their pads in official mode


def torch_student_logits(model, prj, b):
  """The reference student path (encode, N thoughts, teacher-forced decoder) -> decoder logits."""
  return torch_student(model, prj, b).logits.numpy()


def test_gradients_reach_question_through_every_thought():
  """Every thought z_i depends on the question embedding, and so does the student CE."""
  cfg = mcfg.tiny("gpt2", vocab_size=V)
  b = {k: jnp.asarray(v) for k, v in make_batch(np.random.default_rng(1)).items()}
  codi = Codi(transformer.build(cfg, seed=2), rngs=nnx.Rngs(0))
  opts = CodiOptions(num_latent=4)
  graphdef, state = nnx.split(codi)
  q = codi.backbone.embed_tokens(b["encoder_ids"])

  def thought(q_emb, i):
    model = nnx.merge(graphdef, state)
    return encode_and_think(model, b, num_latent=4, enc_embeds=q_emb)[2][i].sum()

  for i in range(4):
    g = jax.jit(jax.grad(thought), static_argnums=1)(q, i)
    assert float(jnp.abs(g).sum()) > 0, i
  g = jax.jit(
    jax.grad(
      lambda q_emb: masked_ce(
        student_forward(nnx.merge(graphdef, state), b, opts, enc_embeds=q_emb).logits,
        b["decoder_labels"],
      )
    )
  )(q)
  assert float(jnp.abs(g).sum()) > 0


@pytest.mark.parametrize("train_special", [False, True])
def test_special_rows_train_only_with_the_flag(train_special):
  """Under LoRA the table is frozen: bot/eot rows move only through the separate `special` param."""
  cfg = mcfg.tiny("gpt2", vocab_size=V).replace(
    lora=mcfg.LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
  )
  b = make_batch(np.random.default_rng(3))
  b["encoder_ids"][:, -1] = V - 2  # the question ends with bot (row V-2 of the table)
  b["decoder_ids"][:, 0] = V - 1  # the answer starts with eot
  b = {k: jnp.asarray(v) for k, v in b.items()}
  codi = Codi(
    transformer.build(cfg, seed=2), train_special_embeddings=train_special, rngs=nnx.Rngs(0)
  )
  extra = ("prj", "special") if train_special else ("prj",)
  graphdef, trainable, frozen = split_trainable(codi, extra=extra)
  opts = CodiOptions(num_latent=2)
  grads = jax.grad(lambda t: codi_loss(nnx.merge(graphdef, t, frozen), b, opts)[0])(trainable)
  names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
  assert ("backbone/embed/special" in names) == train_special
  assert not any("embed/embedding" in n for n in names)  # the table itself never trains under LoRA
  if train_special:
    g = np.asarray(grads["backbone"]["embed"]["special"][...])
    assert np.abs(g[1:]).sum() > 0  # bot and eot rows get gradients
    embed = nnx.merge(graphdef, trainable, frozen).backbone.embed
    embed.special.set_value(embed.special[...] + 1.0)
    table = np.asarray(embed.table())
    np.testing.assert_allclose(table[-3:], np.asarray(embed.special[...]), atol=0)
    np.testing.assert_allclose(
      table[:-3], np.asarray(codi.backbone.embed.embedding[...])[:-3], atol=0
    )
    # Lookups and the tied head see the moved rows, with no call-order rule.
    looked_up = embed(jnp.arange(V - 3, V))
    np.testing.assert_allclose(np.asarray(looked_up), np.asarray(embed.special[...]), atol=0)
    h = jnp.ones((1, table.shape[1]), jnp.float32)
    np.testing.assert_allclose(np.asarray(embed.attend(h)), np.asarray(h @ table.T), atol=1e-5)


def collated_batch():
  """A batch from the data pipeline's own `collate`: question lengths 5/9/1/7, CoT 6/0/11/3, so
  the labelled windows start at different positions and the shortest runs past Lt (clipped)."""
  rng = np.random.default_rng(4)
  q_lens, c_lens = (5, 9, 1, 7), (6, 0, 11, 3)
  answer = [np.array([10, 11, 12, int(rng.integers(13, 20)), 0]) for _ in q_lens]  # eos = 0
  questions = [rng.integers(1, V - 3, n) for n in q_lens]
  cots = [rng.integers(1, V - 3, n) for n in c_lens]
  examples = cb.CodiExamples(
    questions,
    cots,
    answer,
    [2] * len(q_lens),
    range(len(q_lens)),
    cb.SpecialIds(pad=V - 3, bot=V - 2, eot=V - 1, eos=0),
  )
  shapes = cb.fit_shapes(examples, 4)
  assert shapes.teacher_span == 16 and shapes.teacher == 20  # window: 16 of 20 teacher positions
  batch = cb.collate(list(examples), shapes, examples.ids)
  batch.pop("index")
  return batch


@pytest.mark.parametrize("method", ["codi", "cot_sft"])
def test_sparse_teacher_logits_match_full(method):
  """The teacher CE over the labelled window (logits at Lw positions) equals the CE over all Lt
  positions (the path taken by batches without `teacher_label_pos`), with the same gradients."""
  b = {k: jnp.asarray(v) for k, v in collated_batch().items()}
  full = {k: v for k, v in b.items() if k != "teacher_label_pos"}
  _, labels = teacher_label_window(b)
  assert int((labels >= 0).sum()) == int((b["teacher_labels"][:, 1:] >= 0).sum())  # each label once
  backbone = transformer.build(mcfg.tiny("gpt2", vocab_size=V), seed=5)
  graphdef, state = nnx.split(Codi(backbone, rngs=nnx.Rngs(0)))
  opts = CodiOptions(num_latent=2, method=method)

  def loss_fn(s, batch):
    return codi_loss(nnx.merge(graphdef, s), batch, opts)

  loss_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (_, m_sparse), g_sparse = loss_grad(state, b)
  (_, m_full), g_full = loss_grad(state, full)
  assert m_sparse.keys() == m_full.keys()
  for k in m_full:
    np.testing.assert_allclose(
      np.asarray(m_sparse[k]), np.asarray(m_full[k]), atol=1e-5, rtol=0, err_msg=k
    )
  for a, c in zip(jax.tree.leaves(g_sparse), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, rtol=0)
