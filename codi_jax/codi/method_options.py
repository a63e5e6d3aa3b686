"""`config.codi` as a typed option class: the training method, its thoughts, loss weights, memory
knobs and the Coconut / iCoT-SI curricula. Its own module so the training step (codi/losses.py)
does not import the curricula's data pipeline (the accelerator benchmark runs without grain)."""

from __future__ import annotations

import dataclasses
import typing

from codi_jax.codi.model import METHODS, DistillLayers, DistillLoss
from codi_jax.config_rules import DROPOUT, INT32_MAX, Bool, Enum, Int, Num
from codi_jax.data.curriculum import RESETS
from codi_jax.models.layers import RematPolicy
from codi_jax.models.positions import PaddingMode
from codi_jax.options import option


@dataclasses.dataclass(frozen=True)
class MethodOptions:
  """`config.codi`: the training method, its thoughts, loss weights and memory knobs, and the
  Coconut / iCoT-SI curricula."""

  method: str = option(Enum(METHODS, doc="training method"))
  num_latent: int = option(Int(0, doc="continuous thoughts in training"))
  num_latent_infer: int = option(Int(-1, doc="thoughts at inference; -1 = num_latent"))
  prj_dim: int = option(Int(0, doc="projection width; 0 = d_model"))
  use_prj: bool = option(Bool(doc="feed thoughts through the projection"))
  prj_layernorm: bool = option(Bool(doc="layer norm after the projection"))
  prj_dropout: float = option(Num(**DROPOUT, doc="projection dropout"))
  distill_loss: str = option(Enum(typing.get_args(DistillLoss), doc="distillation loss"))
  distill_layers: str = option(Enum(typing.get_args(DistillLayers), doc="distilled layers"))
  distill_div_std: bool = option(Bool(doc="divide the distillation loss by the teacher's std"))
  alpha: float = option(Num(ge=0, doc="student CE weight"))
  beta: float = option(Num(ge=0, doc="distillation weight"))
  gamma: float = option(Num(ge=0, doc="teacher CE weight"))
  padding_mode: str = option(Enum(typing.get_args(PaddingMode), doc="padded questions"))
  separate_teacher_target_pass: bool = option(Bool(doc="reference: run the teacher twice"))
  remat_thoughts: bool = option(Bool(doc="recompute the thought scan in the backward pass"))
  remat_teacher: bool = option(Bool(doc="recompute each teacher-pass block in the backward pass"))
  remat_policy: str = option(Enum(typing.get_args(RematPolicy), doc="what remat keeps"))
  train_special_embeddings: bool = option(Bool(doc="train the pad/bot/eot rows under LoRA"))
  ce_chunk_logits: int = option(
    Int(0, INT32_MAX, doc="logits per fused LM-head + CE chunk; 0 = whole")
  )
  c_thought: int = option(Int(1, doc="Coconut: thoughts per replaced step"))
  max_latent_stage: int = option(Int(0, doc="Coconut: stages replacing steps one by one"))
  epochs_per_stage: int = option(Int(0, doc="Coconut: stage length in epochs"))
  stage_steps: int = option(Int(0, doc="Coconut: stage length in steps; 0 = epochs_per_stage"))
  pad_latent_to_max: bool = option(Bool(doc="Coconut: all thoughts past the last stage"))
  coconut_start_stage: int = option(
    Int(0, doc="Coconut: stage at step 1 (<= max_latent_stage); 1 after CoT-SFT")
  )
  uniform_prob: float = option(
    Num(ge=0, le=1, f32=False, doc="Coconut: probability of a random earlier stage")
  )
  remove_per_epoch: float = option(Num(gt=0, doc="iCoT-SI: removal rounds per epoch"))
  remove_start_from: int = option(Int(0, doc="iCoT-SI: tokens removed at step 1"))
  remove_all_when_remove_beyond: float = option(
    Num(ge=0, inf=True, f32=False, doc="iCoT-SI: remove the whole CoT")
  )
  removal_smoothing_lambda: float = option(
    Num(ge=0, inf=True, f32=False, doc="iCoT-SI: offset smoothing; inf: off")
  )
  keep_position: bool = option(Bool(doc="iCoT-SI: kept tokens keep their positions"))
  reset_optimizer: str = option(Enum(RESETS, doc="baselines: optimizer restarts"))
