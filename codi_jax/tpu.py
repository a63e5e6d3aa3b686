"""TPU chips and topologies for compiling ahead of time from a host without TPUs (`codi_jax.compile`).

`devices(topology)` gives the devices of e.g. "v5e:4x4" from libtpu (the `tpu` extra), with no
chip attached; `CHIPS` holds each generation's published per-chip figures (docs/scale.md cites
Google's pages for each). `quiet_cpu_backend` keeps an installed libtpu out of plain CPU runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import math
import os
import sys
import tempfile

from codi_jax.errors import InputError

GiB = 1 << 30
INSTALL = "pip install -r requirements-tpu.txt (or pip install -e '.[tpu]')"
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on the PCI bus (as jax's hardware_utils detects them)


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures as Google publishes them (docs/scale.md: sources)."""

  name: str
  hbm_bytes: int
  bf16_flops: float  # peak dense bf16 FLOP/s
  hbm_bytes_s: float  # HBM bandwidth, bytes/s


CHIPS = {
  "v4": Chip("TPU v4", 32 * GiB, 275e12, 1200e9),
  "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9),
  "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9),
  "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9),
}


def chip(topology: str) -> Chip:
  """The chip of a topology name "<generation>:<shape>" (v4, v5e, v5p, v6e)."""
  gen = topology.partition(":")[0].lower()
  if gen not in CHIPS or ":" not in topology:
    raise InputError(
      f"--topology: {topology!r}; expected <chip>:<shape> with chip one of {', '.join(CHIPS)} "
      "(e.g. v5e:4x4, v5p:2x2x2)"
    )
  return CHIPS[gen]


def per_device(topology: str, n_devices: int) -> Chip:
  """The figures of one device of `topology`: the chip's, or its share where libtpu describes
  each TensorCore as a device (v4 topologies: 2 per chip)."""
  c = chip(topology)
  dims = [int(d) for d in topology.partition(":")[2].lower().split("x") if d.isdigit()]
  per_chip = max(1, n_devices // max(1, math.prod(dims)))
  if per_chip == 1:
    return c
  return Chip(
    f"{c.name} TensorCore (1/{per_chip} chip)",
    c.hbm_bytes // per_chip,
    c.bf16_flops / per_chip,
    c.hbm_bytes_s / per_chip,
  )


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


@contextlib.contextmanager
def _stderr_quiet():
  """Sends the C++ stderr (fd 2) to a scratch file: libtpu's start-up warnings about TPU
  environment variables concern a host with chips, not a topology description."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def devices(topology: str) -> list:
  """The devices (one per chip) of `topology` for compiling only; InputError (one line) naming the
  install when libtpu is missing or the name is not a topology libtpu knows."""
  chip(topology)
  if not libtpu_installed():
    raise InputError(f"--topology: compiling for TPU needs libtpu: {INSTALL}")
  # Compiling uses no chip: another process holding libtpu's lockfile (a second compile, a run
  # on this TPU VM) must not stop this one.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  try:
    with _stderr_quiet():
      desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # pylint: disable=broad-except  (libtpu's message is the report)
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    raise InputError(f"--topology={topology}: {first}") from None
  return list(desc.devices)


def tpu_attached() -> bool:
  """Whether a TPU chip is on this host's PCI bus."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def quiet_cpu_backend() -> None:
  """With libtpu installed (the `tpu` extra) on a host without TPU chips, jax's backend start
  tries the TPU plugin and libtpu prints 5 warning lines on stderr; this selects the CPU platform
  instead. Call before jax starts a backend. A no-op on a TPU host, without libtpu, when
  JAX_PLATFORMS (or jax_platforms) is set, and where a GPU is visible (its plugin must stay).
  """
  if "JAX_PLATFORMS" in os.environ or not libtpu_installed() or tpu_attached():
    return
  if any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")):
    return
  import jax  # pylint: disable=import-outside-toplevel

  if not jax.config.jax_platforms:
    jax.config.update("jax_platforms", "cpu")
