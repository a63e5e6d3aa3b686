"""TFDS builder `gsm8k_aug`: GSM8k-Aug-style training data as ArrayRecord, for pods (no TensorFlow).

Build once with tensorflow-datasets (`pip install -r requirements-tfds.txt`; ArrayRecord needs no
TensorFlow):

  python -m codi_jax.data.tfds_gsm8k_aug --manual_dir=DIR --data_dir=OUT [--config=aug|nl]

DIR (TFDS's `manual_dir`) holds `train.jsonl` (GSM8k's layout, converted as
`formats.gsm8k_train_rows`) or `train.txt` (`question||cot #### answer` lines, e.g. iCoT's
385k-row GSM8k-Aug; config `aug` only), and optionally `valid.jsonl` or `valid.txt`. Records keep
the whole CoT, their source line and their position: the reference's filters (drop the last step,
digit answers) apply when a run reads them, and reading restores the file order, so a run gets the
records of the JSONL path and, through the same tokenization and `pipeline.codi_dataset`, the same
batches, global order and iterator state. The conversion report (bad rows) is kept in the
dataset's metadata. Train with `config.data.format="tfds"` and `config.data.tfds_data_dir=OUT`.

TPU pods and buckets: ArrayRecord reads by random access, which `gs://` paths do not offer here.
Build to local disk, copy OUT to the bucket (`gsutil -m cp -r OUT gs://BUCKET/tfds`), then on every
host either copy it back to local disk or mount the bucket with gcsfuse (`gcsfuse --implicit-dirs
BUCKET /mnt/BUCKET`) and point `tfds_data_dir` at `/mnt/BUCKET/tfds`. Every host reads the whole
dataset (small: 385k rows is ~100 MB); `codi_dataset` then gives each process its share.
"""

from __future__ import annotations

import os

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags

from codi_jax.data import formats
from codi_jax.data.readers import Row
from codi_jax.errors import InputError, exit_on_input_error

NAME = "gsm8k_aug"
CONFIGS = ("aug", "nl")
SPLITS = ("train", "valid")
_TEXT = ("question", "cot", "answer", "where")
_CHUNK = 4096  # records per batched ArrayRecord read


class Gsm8kAug(tfds.core.GeneratorBasedBuilder):
  """GSM8k-Aug-style (`aug`) or -NL-style (`nl`) rows {question, cot, answer} from local files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Rows converted from local GSM8k JSONL or `||` files."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name="aug", description="CoT = the `<<..>>` calculator steps."),
    tfds.core.BuilderConfig(name="nl", description="CoT = the reasoning text, no annotations."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Put GSM8k's train.jsonl (or a `question||cot #### answer` train.txt) in the manual dir, "
    "optionally with valid.jsonl or valid.txt."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    features = {k: tfds.features.Text() for k in _TEXT}
    features["index"] = tfds.features.Scalar(dtype=np.int64)
    return tfds.core.DatasetInfo(
      builder=self,
      description="GSM8k-Aug-style training rows for CODI (full CoT; filters apply on reading).",
      features=tfds.features.FeaturesDict(features),
      homepage="https://github.com/openai/grade-school-math",
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    generators = {}
    for split in SPLITS:
      path = split_file(manual, split, self.builder_config.name)
      if path is None:
        continue
      rows, report = read_rows(path, self.builder_config.name)
      self.info.metadata[split] = report
      generators[split] = self._generate_examples(rows)
    return generators

  def _generate_examples(self, rows: list[Row]):
    for i, (where, row) in enumerate(rows):
      yield (
        i,
        dict(question=row["question"], cot=row["cot"], answer=row["answer"], where=where, index=i),
      )


def split_file(manual_dir: str, split: str, config: str) -> str | None:
  """The file of `split` in `manual_dir` (`<split>.jsonl` or `<split>.txt`); train is required."""
  found = [
    os.path.join(manual_dir, f"{split}{ext}")
    for ext in (".jsonl", ".txt")
    if os.path.isfile(os.path.join(manual_dir, f"{split}{ext}"))
  ]
  if len(found) > 1:
    raise InputError(f"{manual_dir}: both {split}.jsonl and {split}.txt; keep one")
  if not found:
    if split == "train":
      raise InputError(f"{manual_dir}: no train.jsonl or train.txt (GSM8k-Aug-style sources)")
    return None
  if found[0].endswith(".txt") and config == "nl":
    raise InputError(f"{found[0]}: `||` lines hold no natural-language reasoning for config nl")
  return found[0]


def read_rows(path: str, config: str) -> tuple[list[Row], dict]:
  """Rows of a source file for `config`: GSM8k JSONL converted, or `||` lines as they are."""
  if path.endswith(".txt"):
    return formats.pipe_rows(path)
  return formats.gsm8k_train_rows(path, nl=config == "nl")


def _check_config(config: str) -> None:
  if config not in CONFIGS:
    raise InputError(f"{NAME}: unknown config {config!r}; expected one of {CONFIGS}")


def build(manual_dir: str | os.PathLike, data_dir: str | os.PathLike, config: str = "aug") -> str:
  """Builds `gsm8k_aug/<config>` into `data_dir` (a no-op if there); returns the dataset folder."""
  _check_config(config)
  manual_dir = os.fspath(manual_dir)
  if not os.path.isdir(manual_dir):
    raise InputError(f"{manual_dir}: no such directory (the manual_dir holding train.jsonl)")
  for split in SPLITS:  # Fails early, before TFDS starts.
    split_file(manual_dir, split, config)
  builder = Gsm8kAug(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  )
  return os.fspath(builder.data_dir)


def _prepared(data_dir: str | os.PathLike, config: str) -> Gsm8kAug:
  _check_config(config)
  data_dir = os.fspath(data_dir)
  builder = Gsm8kAug(config=config, data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    raise InputError(
      f"{data_dir}: no prepared {NAME}/{config} dataset; build it with `python -m "
      f"codi_jax.data.tfds_gsm8k_aug --manual_dir=<dir with train.jsonl> --data_dir={data_dir} "
      f"--config={config}`"
    )
  return builder


def splits(data_dir: str | os.PathLike, config: str = "aug") -> list[str]:
  """The splits of the prepared dataset in `data_dir`."""
  return sorted(_prepared(data_dir, config).info.splits)


def array_record_source(
  data_dir: str | os.PathLike, config: str = "aug", split: str = "train"
) -> tuple[grain.sources.ArrayRecordDataSource, tfds.core.DatasetInfo]:
  """Grain's ArrayRecord source over a split's files, and the dataset info (features, metadata)."""
  info = _prepared(data_dir, config).info
  if split not in info.splits:
    raise InputError(f"{info.data_dir}: no split {split!r} (has {sorted(info.splits)})")
  paths = [os.fspath(f.filename) for f in info.splits[split].file_instructions]
  return grain.sources.ArrayRecordDataSource(paths), info


def read_split(
  data_dir: str | os.PathLike, config: str = "aug", split: str = "train"
) -> tuple[list[Row], dict]:
  """A split's rows in source-file order, and the conversion report saved when it was built."""
  source, info = array_record_source(data_dir, config, split)
  rows = [None] * len(source)
  for start in range(0, len(source), _CHUNK):  # Batched reads: far faster than one by one.
    for record in source.__getitems__(range(start, min(start + _CHUNK, len(source)))):
      ex = info.features.deserialize_example_np(record)
      text = {k: ex[k].decode("utf-8") for k in _TEXT}
      rows[int(ex["index"])] = (text.pop("where"), text)
  if any(r is None for r in rows):
    raise InputError(f"{info.data_dir}: split {split!r} lacks some record indices; rebuild it")
  report = dict(info.metadata.get(split, {}))
  report["source"] = f"tfds:{info.data_dir} [{split}] <- {report.get('source')}"
  return rows, report


def _define_flags() -> None:
  # Defined when run as a program, not at import: `--config` would clash with the trainer's.
  flags.DEFINE_string("manual_dir", None, "Folder holding train.jsonl or train.txt.", required=True)
  flags.DEFINE_string("data_dir", None, "TFDS data_dir to write to (local disk).", required=True)
  flags.DEFINE_enum("config", "aug", list(CONFIGS), "aug: calculator steps; nl: reasoning text.")


def main(argv: list[str]) -> None:
  """Builds the dataset from `--manual_dir` into `--data_dir` and prints its train report."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  with exit_on_input_error("tfds_gsm8k_aug"):
    path = build(f.manual_dir, f.data_dir, f.config)
    _, report = read_split(f.data_dir, f.config, "train")
    print(f"{path}: train {formats.summary(report)}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
