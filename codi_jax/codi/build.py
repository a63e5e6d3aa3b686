"""Model assembly for CODI runs: tokenizer, pad/bot/eot tokens, backbone (from scratch or loaded),
vocabulary growth and the projection; eager (`build_model`) or sharded from the start (`init_model`).

Training, evaluation, export and the official-checkpoint path all build models here, so a run's
model is rebuilt exactly from its config.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import jax
from flax import nnx

from codi_jax import config_cross, sharding
from codi_jax.codi.model import Codi
from codi_jax.config_rules import DROPOUT, Bool, Enum, Int, Num, Str
from codi_jax.data import answers
from codi_jax.data.codi_batches import SpecialIds
from codi_jax.errors import InputError
from codi_jax.models import config as mcfg
from codi_jax.models import loader, tokenizer_bpe, transformer
from codi_jax.models.transformer import Transformer
from codi_jax.options import option

SPECIAL_TOKENS = ("[PAD]", "<bot>", "<eot>")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """`config.model`: the backbone (loaded or from scratch), its dtypes, kernel, layout and LoRA."""

  spec: str = option(Str(doc="HF dir | hub id | .gguf | alias; '' = from scratch"))
  arch: str = option(Enum(mcfg.ARCHS, doc="architecture (from scratch)"))
  vocab_size: int = option(Int(0, doc="from scratch: 0 = the tokenizer's size"))
  num_layers: int = option(Int(1, doc="from scratch"))
  d_model: int = option(Int(1, doc="from scratch"))
  num_heads: int = option(Int(1, doc="from scratch"))
  num_kv_heads: int = option(Int(0, doc="from scratch: 0 = num_heads"))
  d_ff: int = option(Int(1, doc="from scratch"))
  max_positions: int = option(Int(1, doc="from scratch: positions (GPT-2: rows of its table)"))
  dropout: float = option(
    Num(**DROPOUT, doc="GPT-2 embedding/attention/residual dropout (scratch)")
  )
  dtype: str = option(Enum(DTYPES, doc="compute dtype"))
  param_dtype: str = option(Enum(DTYPES, doc="base weights' dtype"))
  attention_impl: str = option(Enum(typing.get_args(mcfg.AttentionImpl), doc="attention kernel"))
  scan_layers: bool = option(Bool(doc="one lax.scan over stacked layers (False: unrolled)"))
  lora_rank: int = option(Int(0, doc="0 = full fine-tuning"))
  lora_alpha: float = option(Num(gt=0, doc="LoRA scale alpha / rank"))
  lora_dropout: float = option(Num(**DROPOUT, doc="LoRA input dropout"))


def build_tokenizer(config, train_records):
  spec = config.tokenizer
  if spec == "gpt2":
    return tokenizer_bpe.gpt2_default()
  bpe = config_cross.train_bpe_spec(spec)
  if bpe is not None:
    texts = [
      f"{r['question']} {r['cot']} {answers.ANSWER_PROMPT} {r['answer']}" for r in train_records
    ]
    return tokenizer_bpe.train_bpe(texts, bpe[0], split_digits=bpe[1])
  if spec != "model":
    raise InputError(
      f"--config.tokenizer: unknown tokenizer {spec!r} (model | gpt2 | train_bpe:<vocab>[:numbers])"
    )
  return None  # taken from the loaded model


def _lora(config):
  m = config.model
  return (
    mcfg.LoRAConfig(rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout)
    if m.lora_rank > 0
    else None
  )


def _attention_impl(config) -> str:
  """config.model.attention_impl; "xla" for configs saved before the field existed."""
  return config.model.get("attention_impl", "xla")


def _scan_layers(config) -> bool:
  """config.model.scan_layers; False (the unrolled layout they were saved in) for configs saved
  before the field existed."""
  return config.model.get("scan_layers", False)


def _scratch_config(config, tokenizer) -> mcfg.ModelConfig:
  m = config.model
  if tokenizer is None:
    raise InputError(
      "--config.tokenizer: a model trained from scratch needs a tokenizer (gpt2 or train_bpe)"
    )
  return mcfg.ModelConfig(
    arch=m.arch,
    vocab_size=m.vocab_size or tokenizer.vocab_size,
    num_layers=m.num_layers,
    d_model=m.d_model,
    num_heads=m.num_heads,
    num_kv_heads=m.num_kv_heads or m.num_heads,
    head_dim=m.d_model // m.num_heads,
    d_ff=m.d_ff,
    max_positions=m.max_positions,
    embed_dropout=m.dropout,
    attn_dropout=m.dropout,
    resid_dropout=m.dropout,
    dtype=m.dtype,
    param_dtype=m.param_dtype,
    attention_impl=_attention_impl(config),
    lora=_lora(config),
    scan_layers=_scan_layers(config),
  )


def add_special_tokens(tokenizer, base_vocab: int) -> SpecialIds:
  """pad/bot/eot: the table's last 3 rows where the tokenizer already holds them there (an export
  of a CODI run: the same ids, its trained rows, no growth); else added to the tokenizer as the 3
  rows `_wrap` appends to the embedding table (mean-resized, as the reference)."""
  last = list(range(base_vocab - 3, base_vocab))
  if [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == last:
    return SpecialIds(pad=last[0], bot=last[1], eot=last[2], eos=tokenizer.eos_id)
  ids = tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
  if ids != list(range(base_vocab, base_vocab + 3)):
    # Tokenizers with fewer entries than the embedding table (padded vocabularies): place after the table.
    ids = list(range(base_vocab, base_vocab + 3))
  return SpecialIds(pad=ids[0], bot=ids[1], eot=ids[2], eos=tokenizer.eos_id)


def module_options(config) -> dict:
  """`Codi` constructor options (what the weights are) from `config.codi`."""
  c = config.codi
  return {
    "prj_dim": c.prj_dim,
    "use_prj": c.use_prj and c.method != "coconut",  # Coconut feeds hidden states back as they are
    "prj_layernorm": c.prj_layernorm,
    "prj_dropout": c.prj_dropout,
    "train_special_embeddings": c.train_special_embeddings,
  }


def _wrap(config, backbone: Transformer, grow: bool = True) -> Codi:
  """Grows the vocabulary by pad/bot/eot (mean resizing) unless the table holds them (`grow`
  False: `add_special_tokens` found them) and adds the projection."""
  if grow:
    backbone.resize_vocab(backbone.cfg.vocab_size + 3, jax.random.key(config.seed + 1))
  return Codi(backbone, rngs=nnx.Rngs(params=config.seed + 2), **module_options(config))


def model_config(config, config_json: str = "") -> tuple[mcfg.ModelConfig, SpecialIds]:
  """(backbone config before the vocabulary growth, special ids) from the run's config alone: no
  weights, no data (the hub id's config.json: `loader.load_config`). A model trained from scratch
  with `train_bpe:<vocab>` takes the requested vocabulary, an upper bound of the trained one."""
  m = config.model
  if m.spec or config_json:
    cfg, eos = loader.load_config(
      m.spec,
      dtype=m.dtype,
      param_dtype=m.param_dtype,
      attention_impl=_attention_impl(config),
      lora=_lora(config),
      config_json=config_json,
      scan_layers=_scan_layers(config),
    )
  else:
    bpe = config_cross.train_bpe_spec(config.tokenizer)
    tokenizer = types.SimpleNamespace(vocab_size=bpe[0]) if bpe else build_tokenizer(config, [])
    cfg, eos = _scratch_config(config, tokenizer), None
  V = cfg.vocab_size
  return cfg, SpecialIds(pad=V, bot=V + 1, eot=V + 2, eos=V - 1 if eos is None else eos)


def abstract_model(config, cfg: mcfg.ModelConfig) -> Codi:
  """The run's Codi module as shapes (`nnx.eval_shape`, nothing allocated): the structure
  `init_model` builds from `cfg` (`model_config`), vocabulary growth and projection included."""
  return nnx.eval_shape(lambda: _wrap(config, transformer.build(cfg, seed=config.seed)))


def build_model(config, tokenizer):
  """(Codi module, tokenizer, special ids), built eagerly (unsharded)."""
  m = config.model
  if m.spec:
    loaded = loader.load(
      m.spec,
      dtype=m.dtype,
      param_dtype=m.param_dtype,
      attention_impl=_attention_impl(config),
      lora=_lora(config),
      seed=config.seed,
      scan_layers=_scan_layers(config),
    )
    backbone, tokenizer = loaded.model, tokenizer or loaded.tokenizer
  else:
    backbone = transformer.build(_scratch_config(config, tokenizer), seed=config.seed)
  special = add_special_tokens(tokenizer, backbone.cfg.vocab_size)
  return _wrap(config, backbone, special.pad >= backbone.cfg.vocab_size), tokenizer, special


def init_model(config, tokenizer):
  """(Codi module with parameters sharded on the active mesh, tokenizer, special ids).

  From scratch: shapes first (`nnx.eval_shape`), then a jitted init whose outputs are created
  already sharded, so no device ever holds a full replica. Loaded weights are read and resized on
  the host CPU, then each device receives only its shard. The values are `build_model`'s (the
  jitted init may round the last float bit differently; tested within 1e-7).
  """
  m = config.model
  if not m.spec:
    mcfg_ = _scratch_config(config, tokenizer)
    special = add_special_tokens(tokenizer, mcfg_.vocab_size)

    def make():
      return _wrap(config, transformer.build(mcfg_, seed=config.seed))

    graphdef, abstract = nnx.split(abstract_model(config, mcfg_))
    shardings = sharding.state_shardings(abstract)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state), tokenizer, special
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    codi, tokenizer, special = build_model(config, tokenizer)
  graphdef, state = nnx.split(codi)
  return nnx.merge(graphdef, sharding.shard_state(state)), tokenizer, special
