r"""Export a finished CODI run as a Hugging Face model directory, plus the official CODI layout.

  python -m codi_jax.export --workdir=runs/gpt2 --out=/tmp/codi_gpt2_hf [--overwrite]

<out>/ loads with transformers' AutoModelForCausalLM / AutoTokenizer.from_pretrained:
  config.json               GPT-2, Llama or Qwen2 with the grown vocabulary (V + 3: pad, bot, eot)
  model.safetensors         the backbone, LoRA merged into the base weights (W + alpha/r * A @ B)
                            and the trained special rows written into the embedding table
  generation_config.json    bos/eos/pad ids (every stop id of the run)
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
                            the run's tokenizer; pad is [PAD], bot/eot are additional special tokens
<out>/codi/ holds what the backbone alone cannot: the projection and the thought loop's settings, in
the reference's layout (docs/codi.md 8), so `codi_jax.evaluate --official=<out>/codi --base=<out>`
reproduces the run's evaluation and the reference's test.py loads it (--ckpt_dir=<out>/codi, its
--model_name_or_path being the original base model):
  codi/model.safetensors    `codi.base_model.model.*` (unmerged base, peft `base_layer` names and
                            lora_A/lora_B) + `prj.1.*`, `prj.3.*`, `prj.ln.*`
  codi/codi_config.json     special ids, LoRA rank/alpha, thought count, padding mode, eval shapes
  codi_export.json          the marker of an export (run, time): the only kind of folder
                            --overwrite replaces
Everything is written into a new, uniquely named `.<out name>.<random>.tmp/` beside --out and
renamed to --out when complete; a failed export removes only that folder. A non-empty --out is
replaced (with --overwrite) only when it holds codi_export.json, else refused in one line.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import tokenizers
from absl import app, flags
from tokenizers import AddedToken

from codi_jax import runtime
from codi_jax.codi import build, convert
from codi_jax.codi.model import CodiOptions
from codi_jax.data.codi_batches import SpecialIds
from codi_jax.errors import InputError, exit_on_input_error
from codi_jax.files import as_path, is_url, write_atomic, write_json
from codi_jax.final import FinishedRun, load_final, read_final
from codi_jax.models import hf, weights_io
from codi_jax.workdir import missing_dirs, remove_empty

PROG = "codi_jax.export"
CODI_DIR = "codi"
MARKER = "codi_export.json"  # written last: marks a folder --overwrite may replace
_FILLER = "<|codi_unused_{}|>"


def _check_out(out: str, workdir: str, overwrite: bool):
  if os.path.exists(out) and not os.path.isdir(out):
    raise InputError(f"--out={out}: exists and is not a directory")
  if not is_url(workdir):  # a run in an object store cannot contain a local --out
    run_dir = os.path.abspath(workdir)
    if os.path.commonpath([out, run_dir]) == out:
      raise InputError(f"--out={out}: holds the run {workdir} itself; export next to it instead")
    final = os.path.join(run_dir, "final")
    if os.path.commonpath([out, final]) == final:
      raise InputError(f"--out={out}: inside the run's final/; export next to it instead")
  if os.path.isdir(out) and os.listdir(out):
    if not os.path.isfile(os.path.join(out, MARKER)):
      raise InputError(
        f"--out={out}: exists and is not empty, and is not an export (no {MARKER}), the only "
        "folder --overwrite replaces; choose another --out"
      )
    if not overwrite:
      raise InputError(
        f"--out={out}: exists and is not empty (a previous export); pass --overwrite to replace it"
      )


def _replace(tmp: str, out: str):
  """Moves the finished `tmp` to `out`: into an absent or empty `out`, or over a previous export
  (its marker checked again: it is deleted only once the new export is in place)."""
  if os.path.isdir(out) and os.listdir(out):
    if not os.path.isfile(os.path.join(out, MARKER)):
      raise InputError(f"--out={out}: changed during the export (no {MARKER} any more)")
    old = tempfile.mkdtemp(
      prefix=f".{os.path.basename(out)}.", suffix=".old", dir=os.path.dirname(out)
    )
    os.replace(out, old)  # onto our own empty folder: atomic
    try:
      os.replace(tmp, out)
    except BaseException:
      os.replace(old, out)  # the previous export back in place
      raise
    shutil.rmtree(old)
  else:
    os.replace(tmp, out)


def aligned_tokenizer(backend: tokenizers.Tokenizer, special: SpecialIds) -> tokenizers.Tokenizer:
  """The run's tokenizer with [PAD]/<bot>/<eot> at the model's rows pad, bot, eot.

  A tokenizer smaller than the embedding table (e.g. Qwen2's padded vocabulary) holds them at its
  own end instead; unused filler tokens are inserted so HF's ids match the rows.
  """
  want = [special.pad, special.bot, special.eot]
  if [backend.token_to_id(t) for t in build.SPECIAL_TOKENS] == want:
    return backend
  data = json.loads(backend.to_str())
  data["added_tokens"] = [
    t for t in data.get("added_tokens", []) if t["content"] not in build.SPECIAL_TOKENS
  ]
  fixed = tokenizers.Tokenizer.from_str(json.dumps(data))
  size = fixed.get_vocab_size(with_added_tokens=True)
  if size > special.pad:
    raise InputError(
      f"tokenizer has {size} tokens besides pad/bot/eot, more than the model's {special.pad} rows"
    )
  fillers = [_FILLER.format(i) for i in range(size, special.pad)]
  names = [*fillers, *build.SPECIAL_TOKENS]
  fixed.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
  got = [fixed.token_to_id(t) for t in build.SPECIAL_TOKENS]
  if got != want:
    raise InputError(f"tokenizer: cannot place pad/bot/eot at ids {want} (got {got})")
  return fixed


def bos_id(tok) -> int | None:
  """The tokenizer's BOS: its bos_id, else the token its post-processor puts before a text."""
  if tok.bos_id is not None:
    return tok.bos_id
  with_specials = tok.backend.encode("1", add_special_tokens=True).ids
  plain = tok.backend.encode("1", add_special_tokens=False).ids
  if len(with_specials) > len(plain) and with_specials[-len(plain) :] == plain:
    return with_specials[0]
  return None


def _tokenizer_files(run: FinishedRun, max_length: int) -> dict[str, dict | str]:
  """tokenizer.json text and the two HF tokenizer config files."""
  backend = aligned_tokenizer(run.tokenizer.backend, run.special)
  tok = run.tokenizer
  text = tok.id_to_token
  pad, bot, eot = build.SPECIAL_TOKENS
  bos = bos_id(tok)
  names = {
    "bos_token": text(bos) if bos is not None else None,
    "eos_token": text(run.special.eos),
    "unk_token": text(tok.unk_id) if tok.unk_id is not None else None,
    "pad_token": pad,
  }
  names = {k: v for k, v in names.items() if v is not None}
  special_map = {**names, "additional_special_tokens": [bot, eot]}
  config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "model_max_length": max_length,
    "clean_up_tokenization_spaces": False,
    **special_map,
  }
  return {
    "tokenizer.json": backend.to_str(pretty=True),
    "tokenizer_config.json": config,
    "special_tokens_map.json": special_map,
  }


def export(workdir: str, out: str, *, overwrite: bool = False) -> dict:
  """Writes the HF directory and the CODI layout of `workdir`'s finished run to `out`.

  Returns {out, codi, arch, vocab_size, special_ids}.
  """
  read_final(workdir)  # one-line errors for a missing or unfinished run
  out = os.path.abspath(out)
  _check_out(out, workdir, overwrite)
  run = load_final(workdir)
  parents = missing_dirs(os.path.dirname(out))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(
    prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=os.path.dirname(out)
  )
  try:
    res = _write(run, workdir, tmp)
    _replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)  # ours: a unique name
    remove_empty(parents)
    raise
  return {"out": out, "codi": os.path.join(out, CODI_DIR), **res}


def _write(run: FinishedRun, workdir: str, tmp: str) -> dict:
  """The export's files in the (empty) folder `tmp`, the marker last; {arch, vocab_size,
  special_ids}."""
  codi, cfg, special, config = run.codi, run.codi.backbone.cfg, run.special, run.config
  os.makedirs(os.path.join(tmp, CODI_DIR))

  tensors = {
    hf.full_name(k, cfg.arch): v
    for k, v in hf.export_tensors(codi.backbone, merge_lora=True).items()
  }
  weights_io.write_safetensors(os.path.join(tmp, "model.safetensors"), tensors)
  bos = bos_id(run.tokenizer)
  write_json(
    os.path.join(tmp, "config.json"),
    hf.config_to_hf(cfg, bos_token_id=bos, eos_token_id=special.eos, pad_token_id=special.pad),
  )
  eos_ids = run.eos_ids
  write_json(
    os.path.join(tmp, "generation_config.json"),
    {
      "bos_token_id": bos,
      "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0],
      "pad_token_id": special.pad,
    },
  )
  for name, content in _tokenizer_files(run, cfg.max_positions).items():
    path = os.path.join(tmp, name)
    if isinstance(content, str):
      write_atomic(path, content)
    else:
      write_json(path, content)

  weights_io.write_safetensors(
    os.path.join(tmp, CODI_DIR, "model.safetensors"), convert.official_tensors(codi)
  )
  opts = CodiOptions.from_config(config.codi, inference=True)
  settings = convert.settings_of(
    codi,
    special,
    method=opts.method,
    num_latent=opts.num_latent,
    padding_mode=opts.padding_mode,
    use_prj=codi.prj is not None,
    prj_dim=int(codi.prj.w1.shape[1]) if codi.prj is not None else 0,
    prj_layernorm=codi.prj is not None and codi.prj.ln is not None,
    eval={
      "buckets": config.data.buckets,
      "batch_size": config.eval.batch_size,
      "max_new_tokens": config.eval.max_new_tokens,
    },
    workdir=os.fspath(as_path(workdir)),  # gs://... kept as given
  )
  write_json(os.path.join(tmp, CODI_DIR, convert.SETTINGS_FILE), settings)
  write_json(
    os.path.join(tmp, MARKER),
    {"written_by": PROG, "workdir": os.fspath(as_path(workdir)), "time": time.time()},
  )
  return {"arch": cfg.arch, "vocab_size": cfg.vocab_size, "special_ids": settings["special_ids"]}


# ---------------------------------------------------------------------------------------- CLI


def _define_flags():
  """CLI flags, defined only when run as a program, so that importing this module defines none."""
  flags.DEFINE_string("workdir", None, "Run directory holding final/ (from codi_jax.train).")
  flags.DEFINE_string("out", None, "Output directory (must be empty or absent).")
  flags.DEFINE_bool(
    "overwrite", False, f"Replace a previous export in --out (one holding {MARKER}); nothing else."
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime.setup_cli()
  with exit_on_input_error(PROG):
    for name in ("workdir", "out"):
      if not flags.FLAGS[name].value:
        raise InputError(f"--{name}: required")
    res = export(flags.FLAGS.workdir, flags.FLAGS.out, overwrite=flags.FLAGS.overwrite)
  ids = res["special_ids"]
  print(
    f"exported {flags.FLAGS.workdir} -> {res['out']} ({res['arch']}, vocabulary "
    f"{res['vocab_size']}: pad/bot/eot = {ids['pad']}/{ids['bot']}/{ids['eot']}); CODI layout "
    f"(projection, LoRA factors, settings) in {res['codi']}",
    flush=True,
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=runtime.flags_parser(PROG))
