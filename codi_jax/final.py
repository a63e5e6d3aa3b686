"""A finished run's `<workdir>/final/`: written once at the end of training, read by evaluation and
export.

Layout: `params/` (Orbax, the full parameter tree), `train_config.json` (the run's ml_collections
config; not an HF config), `tokenizer.json` (with pad/bot/eot), `run.json` (special ids, stop ids,
the training summary). Written into `final.tmp/` and renamed when complete. On an object store
(gs://...: through `etils.epath`, as everything under a workdir) a rename is a copy of every object,
so `final/` is written in place and `run.json` last: a `final/` without it is an interrupted save.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
import orbax.checkpoint as ocp
import tokenizers
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from codi_jax import files
from codi_jax.codi import build
from codi_jax.codi.model import Codi
from codi_jax.data.codi_batches import SpecialIds
from codi_jax.errors import InputError
from codi_jax.models.tokenizer import Tokenizer

CONFIG_FILE = "train_config.json"  # the training config (ml_collections), not a model config


def save_final(workdir, state, config, tokenizer, special, summary):
  """Parameters (orbax) plus everything needed to rebuild the model: config, tokenizer, special ids.

  Every process takes part in writing the (possibly sharded) parameters; process 0 writes the rest
  and moves `final.tmp/` to `final/` once all of it is on disk (on an object store: writes `final/`
  in place, run.json last). Returns the final/ path.
  """
  final = files.as_path(workdir) / "final"
  remote = files.is_url(final)
  tmp = final if remote else final.parent / "final.tmp"
  main = jax.process_index() == 0
  if main and tmp.exists():
    tmp.rmtree()
  multihost_utils.sync_global_devices("codi_jax:final:clean")
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp / "params", nnx.to_pure_dict(state))
  multihost_utils.sync_global_devices("codi_jax:final:params")
  if main:
    (tmp / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
    (tmp / "tokenizer.json").write_text(tokenizer.backend.to_str(pretty=True))
    run = {
      "special_ids": dataclasses.asdict(special),
      "eos_ids": list(tokenizer.eos_ids),
      **summary,
    }
    (tmp / "run.json").write_text(json.dumps(run, indent=2))  # last: in place, it marks completion
    if not remote:
      if final.exists():
        final.rmtree()
      tmp.replace(final)
  multihost_utils.sync_global_devices("codi_jax:final:done")
  return str(final)


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


def _read_json(path: epath.Path):
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: cannot read ({e})") from None


def read_final(workdir) -> tuple[str, ml_collections.ConfigDict, dict]:
  """(final/ path, saved config, run.json) of a finished run, checked; nothing is built."""
  root = files.as_path(workdir)
  final = root / "final"
  if not final.is_dir():
    if not root.is_dir():
      raise InputError(f"{workdir}: no such directory")
    if (root / "final.tmp").is_dir():
      raise InputError(
        f"{workdir}: unfinished run (final.tmp/ but no final/: saving was interrupted)"
      )
    raise InputError(
      f"{workdir}: no finished run (no final/); train first: "
      f"python -m codi_jax.train --config=... --workdir={workdir}"
    )
  for name in (CONFIG_FILE, "run.json", "tokenizer.json", "params"):
    if not (final / name).exists():
      raise InputError(f"{final}: incomplete checkpoint (no {name})")
  config = ml_collections.ConfigDict(_read_json(final / CONFIG_FILE))
  return str(final), config, _read_json(final / "run.json")


def load_final(workdir: str) -> FinishedRun:
  """Model, tokenizer and config of a finished run; InputError (one line) if there is none."""
  final, config, run = read_final(workdir)
  try:
    special = SpecialIds(**run["special_ids"])
  except (KeyError, TypeError) as e:
    raise InputError(f"{final}/run.json: no valid special_ids ({e})") from None

  tok_path = f"{final}/tokenizer.json"
  try:
    backend = tokenizers.Tokenizer.from_str(epath.Path(tok_path).read_text())
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
      restored = ckpt.restore(epath.Path(final) / "params", nnx.to_pure_dict(params))
  except Exception as e:  # noqa: BLE001  (any load failure is reported in one line)
    first = (str(e).strip().splitlines() or [""])[0]
    raise InputError(
      f"{final}/params: does not match the model of {CONFIG_FILE} ({type(e).__name__}: {first})"
    ) from None
  nnx.replace_by_pure_dict(params, restored)
  nnx.update(codi, params)
  return FinishedRun(codi, tokenizer, special, config, run, final)
