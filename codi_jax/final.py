"""A finished run's `<workdir>/final/`: written once at the end of training, read by evaluation and
export.

Layout: `params/` (Orbax, the full parameter tree), `train_config.json` (the run's ml_collections
config; not an HF config), `tokenizer.json` (with pad/bot/eot), `run.json` (special ids, stop ids,
the training summary). Written into `final.tmp/` and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import ml_collections
import orbax.checkpoint as ocp
import tokenizers
from flax import nnx
from jax.experimental import multihost_utils

from codi_jax.codi import build
from codi_jax.codi.model import Codi
from codi_jax.data.codi_batches import SpecialIds
from codi_jax.errors import InputError
from codi_jax.models.tokenizer import Tokenizer

CONFIG_FILE = "train_config.json"  # the training config (ml_collections), not a model config


def save_final(workdir, state, config, tokenizer, special, summary):
  """Parameters (orbax) plus everything needed to rebuild the model: config, tokenizer, special ids.

  Every process takes part in writing the (possibly sharded) parameters; process 0 writes the rest
  and moves `final.tmp/` to `final/` once all of it is on disk.
  """
  final = os.path.join(os.path.abspath(workdir), "final")
  tmp = final + ".tmp"
  main = jax.process_index() == 0
  if main and os.path.exists(tmp):
    shutil.rmtree(tmp)
  multihost_utils.sync_global_devices("codi_jax:final:clean")
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(tmp, "params"), nnx.to_pure_dict(state))
  multihost_utils.sync_global_devices("codi_jax:final:params")
  if main:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    tokenizer.backend.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "run.json"), "w") as f:
      json.dump(
        {"special_ids": dataclasses.asdict(special), "eos_ids": list(tokenizer.eos_ids), **summary},
        f,
        indent=2,
      )
    if os.path.exists(final):
      shutil.rmtree(final)
    os.replace(tmp, final)
  multihost_utils.sync_global_devices("codi_jax:final:done")
  return final


@dataclasses.dataclass
class FinishedRun:
  """A finished run restored from `<workdir>/final`."""

  codi: Codi
  tokenizer: Tokenizer
  special: SpecialIds
  config: ml_collections.ConfigDict  # the run's saved config
  run: dict  # run.json: special ids, stop ids, training summary
  path: str  # the final/ directory

  @property
  def method(self) -> str:
    return self.config.codi.method

  @property
  def eos_ids(self) -> list[int]:
    return sorted({int(self.special.eos), *(int(i) for i in self.run.get("eos_ids", []))})


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: cannot read ({e})") from None


def read_final(workdir: str) -> tuple[str, ml_collections.ConfigDict, dict]:
  """(final/ path, saved config, run.json) of a finished run, checked; nothing is built."""
  final = os.path.join(os.path.abspath(workdir), "final")
  if not os.path.isdir(final):
    if not os.path.isdir(workdir):
      raise InputError(f"{workdir}: no such directory")
    if os.path.isdir(final + ".tmp"):
      raise InputError(
        f"{workdir}: unfinished run (final.tmp/ but no final/: saving was interrupted)"
      )
    raise InputError(
      f"{workdir}: no finished run (no final/); train first: "
      f"python -m codi_jax.train --config=... --workdir={workdir}"
    )
  for name in (CONFIG_FILE, "run.json", "tokenizer.json", "params"):
    if not os.path.exists(os.path.join(final, name)):
      raise InputError(f"{final}: incomplete checkpoint (no {name})")
  config = ml_collections.ConfigDict(_read_json(os.path.join(final, CONFIG_FILE)))
  return final, config, _read_json(os.path.join(final, "run.json"))


def load_final(workdir: str) -> FinishedRun:
  """Model, tokenizer and config of a finished run; InputError (one line) if there is none."""
  final, config, run = read_final(workdir)
  try:
    special = SpecialIds(**run["special_ids"])
  except (KeyError, TypeError) as e:
    raise InputError(f"{final}/run.json: no valid special_ids ({e})") from None

  tok_path = os.path.join(final, "tokenizer.json")
  try:
    backend = tokenizers.Tokenizer.from_file(tok_path)
  except Exception as e:  # noqa: BLE001  (any load failure is reported in one line)
    raise InputError(f"{tok_path}: cannot load ({type(e).__name__}: {e})") from None
  with_specials = backend.encode("1", add_special_tokens=True).ids
  bare = backend.encode("1", add_special_tokens=False).ids
  bos = with_specials[0] if len(with_specials) > len(bare) else None
  tokenizer = Tokenizer(
    backend, bos_id=bos, eos_id=special.eos, extra_eos_ids=run.get("eos_ids", ()), source=tok_path
  )

  if not config.model.spec:  # from scratch: the saved tokenizer already holds pad/bot/eot
    config.model.vocab_size = special.pad
  codi, tokenizer, built = build.build_model(config, tokenizer)
  if built != special:
    raise InputError(f"{final}: rebuilt special ids {built} differ from run.json's {special}")
  params = nnx.state(codi, nnx.Param)
  try:
    with ocp.StandardCheckpointer() as ckpt:
      restored = ckpt.restore(os.path.join(final, "params"), nnx.to_pure_dict(params))
  except Exception as e:  # noqa: BLE001  (any load failure is reported in one line)
    first = (str(e).strip().splitlines() or [""])[0]
    raise InputError(
      f"{final}/params: does not match the model of {CONFIG_FILE} ({type(e).__name__}: {first})"
    ) from None
  nnx.replace_by_pure_dict(params, restored)
  nnx.update(codi, params)
  return FinishedRun(codi, tokenizer, special, config, run, final)
