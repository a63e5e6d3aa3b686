"""The reference CODI training step in PyTorch: HF transformers GPT-2 + peft-style LoRA written out.

Used by `benchmarks/codi_step.py` only. It follows the official forward (zhenyi4/codi `src/model.py`
@ 4fd88d4, described in docs/codi.md section 3) step by step, inefficiencies included, since
the point is to time the reference algorithm rather than an idealised one:

* the encoder pass computes full-vocabulary logits (HF always does) that nothing uses;
* the teacher runs twice: once under `no_grad` for the distillation targets, once with gradients for
  its CE (`separate_teacher_pass`);
* with `print_ref_model_stats=True` (set in `train_gpt2_gsm8k-aug.sh`) a softmax over all teacher
  logits is taken every step to print one probability (`ref_stats_softmax`; we skip the print);
* the latent loop is a Python loop of one-token forwards over `past_key_values`, and projects the
  last latent's output too (z_{N+1}, never used);
* latent and answer passes get no attention mask (`fix_attn_mask=False`); positions follow the
  cache;
* the losses are pulled to the host with `.item()` inside the forward.

peft is not installed here, so LoRA is `LoRAConv1D` below, with peft's math for GPT-2's Conv1D
(`fan_in_fan_out=True`): y = base(x) + B(A(dropout(x))) * alpha / r, base frozen, A and B trainable.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import math

import numpy as np
import torch
import transformers
from torch import nn

IGNORE = -100


class LoRAConv1D(nn.Module):
  """peft's `lora.Linear` over a GPT-2 `Conv1D` (weight [in, out]): base(x) + B(A(drop(x))) * s."""

  def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
    super().__init__()
    din, dout = base.weight.shape
    self.base_layer = base
    self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    self.lora_A = nn.Linear(din, rank, bias=False)
    self.lora_B = nn.Linear(rank, dout, bias=False)
    nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default init
    nn.init.zeros_(self.lora_B.weight)
    self.scaling = alpha / rank

  def forward(self, x):
    return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def apply_lora(
  model: nn.Module, rank: int, alpha: float, dropout: float, targets=("c_attn", "c_proj", "c_fc")
) -> list[str]:
  """Freezes every base parameter and wraps each targeted Conv1D (peft name matching)."""
  for p in model.parameters():
    p.requires_grad_(False)
  conv1d = transformers.pytorch_utils.Conv1D
  names = [
    n for n, m in model.named_modules() if isinstance(m, conv1d) and n.split(".")[-1] in targets
  ]
  for name in names:
    parent_name, child = name.rsplit(".", 1)
    parent = model.get_submodule(parent_name)
    setattr(parent, child, LoRAConv1D(getattr(parent, child), rank, alpha, dropout))
  return names


def make_prj(d: int, p: int, dropout: float = 0.0) -> nn.Sequential:
  """The reference `prj`: Dropout -> Linear -> GELU -> Linear -> LayerNorm (trainable)."""
  seq = nn.Sequential(nn.Dropout(dropout), nn.Linear(d, p), nn.GELU(), nn.Linear(p, d))
  seq.add_module("ln", nn.LayerNorm(d))
  return seq


def codi_forward(
  model,
  prj,
  b: dict,
  *,
  num_latent: int,
  beta: float = 1.0,
  gamma: float = 1.0,
  separate_teacher_pass: bool = True,
  ref_stats_softmax: bool = True,
) -> dict:
  """The official `CODI.forward` on one batch of our layout (torch tensors); returns losses.

  `b` uses codi_jax's batch keys; the official argument names are in the comments. The official
  code moves the distillation positions by -1 from the answer position; our batch already holds the
  distilled index (the ':' for GPT-2).
  """
  # Encode the question (encoder_input_ids, encoder_attention_mask); HF computes full logits here.
  out = model(
    input_ids=b["encoder_ids"],
    attention_mask=b["encoder_mask"].long(),
    use_cache=True,
    output_hidden_states=True,
  )
  past = out.past_key_values
  latent = prj(out.hidden_states[-1][:, -1, :].unsqueeze(1))

  # Teacher (ref_input_ids); fix_attn_mask=False drops ref_attention_mask.
  if separate_teacher_pass:
    with torch.no_grad():
      ref = model(input_ids=b["teacher_ids"], output_hidden_states=True)
    ref_grad = model(input_ids=b["teacher_ids"], output_hidden_states=True)
  else:
    ref = ref_grad = model(input_ids=b["teacher_ids"], output_hidden_states=True)
  if ref_stats_softmax:  # print_ref_model_stats: P(first answer token) via a full-vocab softmax
    probs = torch.softmax(ref.logits, dim=-1)
    pos = b["teacher_distill_index"] + 1  # the official ref_answer_position
    at = probs.gather(1, (pos - 1)[:, None, None].expand(-1, -1, probs.size(2)))
    tgt = b["teacher_ids"].gather(1, pos[:, None])[:, None]
    _ = at.gather(2, tgt).mean()

  ce = nn.CrossEntropyLoss(ignore_index=IGNORE)
  smooth_l1 = nn.SmoothL1Loss()
  for i in range(num_latent):
    out = model(
      inputs_embeds=latent, use_cache=True, output_hidden_states=True, past_key_values=past
    )
    past = out.past_key_values
    latent = prj(out.hidden_states[-1][:, -1, :].unsqueeze(1))  # z_{N+1} too, as the reference
    if i == num_latent - 1:
      embds = model.get_input_embeddings()(b["decoder_ids"])
      out = model(
        inputs_embeds=embds, use_cache=True, output_hidden_states=True, past_key_values=past
      )
      distill = 0
      for hs, ht in zip(out.hidden_states, ref.hidden_states):
        t = ht.gather(1, b["teacher_distill_index"][:, None, None].expand(-1, -1, ht.size(-1)))
        s = hs.gather(1, b["decoder_distill_index"][:, None, None].expand(-1, -1, hs.size(-1)))
        distill = distill + smooth_l1(s, t.detach()) / t.std()
      distill = distill / len(out.hidden_states)
      logits = out.logits
      ce_student = ce(
        logits[:, :-1].reshape(-1, logits.size(-1)), b["decoder_labels"][:, 1:].reshape(-1)
      )
  ref_logits = ref_grad.logits
  ce_teacher = ce(
    ref_logits[:, :-1].reshape(-1, ref_logits.size(-1)), b["teacher_labels"][:, 1:].reshape(-1)
  )
  loss = ce_student + beta * distill + gamma * ce_teacher
  return {
    "loss": loss,
    "ce_student": ce_student.detach().item(),
    "distill": distill.detach().item(),
    "ce_teacher": ce_teacher.detach().item(),
  }


def param_groups(named_params, weight_decay: float) -> list[dict]:
  """HF Trainer's grouping: no decay on biases and LayerNorm weights."""
  decay, no_decay = [], []
  for name, p in named_params:
    if not p.requires_grad:
      continue
    norm = ".ln" in name or "layernorm" in name.lower()
    (no_decay if name.endswith("bias") or norm else decay).append(p)
  return [
    {"params": decay, "weight_decay": weight_decay},
    {"params": no_decay, "weight_decay": 0.0},
  ]


def _tensor(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, np.float32))


class TorchCodi:
  """GPT-2 + LoRA + prj and an AdamW/cosine/clipping step, as HF Trainer runs the reference."""

  def __init__(
    self,
    hf_config: transformers.GPT2Config,
    *,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    prj_dim: int,
    lr: float,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    clip: float,
    warmup_steps: int,
    total_steps: int,
    num_latent: int,
    official: bool = True,
  ):
    self.model = transformers.GPT2LMHeadModel(hf_config)
    apply_lora(self.model, lora_rank, lora_alpha, lora_dropout)
    self.prj = make_prj(hf_config.n_embd, prj_dim)
    self.num_latent = num_latent
    self.official = official
    self.clip = clip
    named = [
      *self.model.named_parameters(),
      *(("prj." + n, p) for n, p in self.prj.named_parameters()),
    ]
    self.trainable = [p for _, p in named if p.requires_grad]
    self.opt = torch.optim.AdamW(param_groups(named, weight_decay), lr=lr, betas=(b1, b2), eps=eps)
    self.sched = transformers.get_cosine_schedule_with_warmup(self.opt, warmup_steps, total_steps)

  def load_from_ours(
    self,
    tensors: dict[str, np.ndarray],
    lora: dict[str, tuple[np.ndarray, np.ndarray]],
    prj: dict[str, np.ndarray],
  ):
    """Copies our weights in.

    Args:
      tensors: base tensors under HF GPT-2 names; every torch parameter must be covered.
      lora: (A [in, r], B [r, out]) per module name such as "h.0.attn.c_attn".
      prj: w1, b1, w2, b2, ln_scale, ln_bias of our projection.
    """
    tr = self.model.transformer
    with torch.no_grad():
      sd = tr.state_dict()
      done = set()
      for name, value in tensors.items():
        key = (
          name
          if name in sd
          else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        sd[key].copy_(_tensor(value))
        done.add(key)
      for module, (a, b) in lora.items():
        m = tr.get_submodule(module)
        m.lora_A.weight.copy_(_tensor(a.T))
        m.lora_B.weight.copy_(_tensor(b.T))
        done.update({f"{module}.lora_A.weight", f"{module}.lora_B.weight"})
      missing = sorted(set(sd) - done)
      if missing:
        raise ValueError(f"torch parameters not copied from ours: {missing[:5]}")
      self.model.tie_weights()
      p = self.prj
      p[1].weight.copy_(_tensor(prj["w1"].T))
      p[1].bias.copy_(_tensor(prj["b1"]))
      p[3].weight.copy_(_tensor(prj["w2"].T))
      p[3].bias.copy_(_tensor(prj["b2"]))
      p.ln.weight.copy_(_tensor(prj["ln_scale"]))
      p.ln.bias.copy_(_tensor(prj["ln_bias"]))

  def _forward(self, batch: dict) -> dict:
    return codi_forward(
      self.model,
      self.prj,
      batch,
      num_latent=self.num_latent,
      separate_teacher_pass=self.official,
      ref_stats_softmax=self.official,
    )

  def losses(self, batch: dict) -> dict:
    """Deterministic losses (eval mode: dropout off), no gradients."""
    self.model.eval()
    self.prj.eval()
    with torch.no_grad():
      out = self._forward(batch)
    return {k: float(v) for k, v in out.items()}

  def train_step(self, batch: dict) -> float:
    """One HF-Trainer step: train mode, forward, backward, clip, AdamW, schedule, zero_grad."""
    self.model.train()
    self.prj.train()
    out = self._forward(batch)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(self.trainable, self.clip)
    self.opt.step()
    self.sched.step()
    self.model.zero_grad(set_to_none=True)
    self.prj.zero_grad(set_to_none=True)
    return out["loss"].item()
