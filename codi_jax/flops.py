"""Model FLOPs of one CODI train step by formula, for every method (MFU's numerator).

With B rows and, per row, Lt teacher tokens, Lq encoder tokens ([question][bot]), N thoughts, La
decoder tokens and Lw teacher logit rows (the labelled window; without one, Lt - 1: the last
position has no next label, as the decoder's; logit rows = Lw + La - 1):
  dense     = B x positions x (k P_dense + 6 P_lora), k = 4 under LoRA (forward 2 + input
              gradient 2; frozen weights get no weight gradient), 6 in full fine-tuning
  head      = B (logit rows) k V D  (the LM head at the positions the losses read)
  attention = 12 H Dh L S B, S = visible keys summed over queries (causal): Lt(Lt+1)/2 for the
              teacher, Lq(Lq+1)/2 + sum_j (Lq + j) over thoughts + sum_k (Lq + N + k) over decoder
              tokens for the student (forward 4 H Dh per key, backward twice that)
  prj       = 6 B N (2 D^2)  (CODI's trainable projection, once per thought)
Passes per method: codi = teacher + student (+ a forward-only teacher pass for the distillation
targets with `separate_teacher_target_pass`: 2 (P_dense + P_lora) per position, 4 H Dh L per key,
no logits); cot_sft and icot_si = teacher; no_cot_sft = student with N = 0; coconut = student
(decoder = [eot][CoT][answer]), no projection. Needs nothing beyond the standard library.
"""
# pylint: disable=invalid-name

from __future__ import annotations

from collections.abc import Mapping

TEACHER = ("codi", "cot_sft", "icot_si")
STUDENT = ("codi", "no_cot_sft", "coconut")


def block_linears(cfg) -> list[tuple[int, int]]:
  """(in, out) of every linear layer of one block."""
  D, F, H, K, Dh = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  if cfg.arch == "gpt2":
    return [(D, 3 * D), (D, D), (D, F), (F, D)]
  return [(D, H * Dh), (D, K * Dh), (D, K * Dh), (H * Dh, D), (D, F), (D, F), (F, D)]


def _passes(lengths: Mapping[str, int], thoughts: int, method: str):
  """(teacher positions or 0, student (Lq, N, La) or None) of one row."""
  Lt = lengths.get("teacher", 0) if method in TEACHER else 0
  student = None
  if method in STUDENT:
    N = 0 if method == "no_cot_sft" else thoughts
    student = (lengths["question"], N, lengths["decoder"])
  return Lt, student


def positions(lengths: Mapping[str, int], thoughts: int, method: str = "codi") -> int:
  """Positions one row runs through the model with gradients (teacher + encoder + thoughts +
  decoder, as the method trains them)."""
  Lt, student = _passes(lengths, thoughts, method)
  return Lt + (sum(student) if student else 0)


def train_flops(
  cfg,
  lengths: Mapping[str, int],
  *,
  batch: int,
  thoughts: int,
  lora_rank: int,
  full_ft: bool,
  method: str = "codi",
  separate_teacher_pass: bool = False,
  projection: bool = True,
) -> dict[str, int]:
  """Model FLOPs of one train step by the module docstring's formula, per term and "total".

  lengths: the batch's padded lengths as `codi_batches.Shapes` names them (question, teacher,
  decoder, teacher_span; Coconut: question and decoder)."""
  L, D, V, B = cfg.num_layers, cfg.d_model, cfg.vocab_size, batch
  lin = block_linears(cfg)
  p_dense = L * sum(i * o for i, o in lin)
  p_lora = 0 if full_ft else L * sum(lora_rank * (i + o) for i, o in lin)
  k = 6 if full_ft else 4
  Lt, student = _passes(lengths, thoughts, method)
  logit_rows, keys, N = 0, 0, 0
  if Lt:  # the labelled window, else every position but the last (it has no next label)
    logit_rows += lengths.get("teacher_span") or Lt - 1
    keys += Lt * (Lt + 1) // 2
  if student:
    Lq, N, La = student
    logit_rows += La - 1  # the decoder's last position has no next label: no logits
    keys += Lq * (Lq + 1) // 2 + sum(Lq + j for j in range(1, N + 1))
    keys += sum(Lq + N + j for j in range(1, La + 1))
  attn = cfg.num_heads * cfg.head_dim * L * B
  terms = {
    "dense": B * positions(lengths, thoughts, method) * (k * p_dense + 6 * p_lora),
    "head": B * logit_rows * k * V * D,
    "attention": 12 * attn * keys,
    "prj": 6 * B * N * 2 * D * D if projection and method == "codi" else 0,
  }
  if separate_teacher_pass and method == "codi":
    T = lengths["teacher"]
    terms["dense"] += B * T * 2 * (p_dense + p_lora)
    terms["attention"] += 4 * attn * (T * (T + 1) // 2)
  terms["total"] = sum(terms.values())
  return terms
