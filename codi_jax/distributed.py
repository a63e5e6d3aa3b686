"""Multi-host start-up: one function decides whether and how to call `jax.distributed.initialize`.

Every entry point calls `maybe_initialize()` first. The environment decides (first match wins):

1. `CODI_JAX_DISTRIBUTED=0`: single process, whatever else is set.
2. An explicit coordinator: `CODI_JAX_COORDINATOR` (host:port), `CODI_JAX_NUM_PROCESSES`,
   `CODI_JAX_PROCESS_ID` (or JAX's own `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
   `JAX_PROCESS_ID`): what `launch/local.py` and `launch/gpu_multinode.sh` set.
3. `CODI_JAX_DISTRIBUTED=1`: bare `initialize()`, which auto-detects Cloud TPU, SLURM, Open MPI
   and Kubernetes (what `launch/tpu.sh` and `launch/slurm_train.sbatch` set).
4. A multi-host Cloud TPU slice (`TPU_WORKER_HOSTNAMES` with several hosts) or a SLURM job step
   with several tasks (`SLURM_STEP_NUM_TASKS` > 1): bare `initialize()` as in 3.
5. Otherwise: single process (a bare `initialize()` would fail on one non-TPU host).

On the CPU platform the cross-process collectives use gloo. Failures are one-line `InputError`s.
"""

from __future__ import annotations

import os

from codi_jax.errors import InputError

_ENV_SETS = (
  ("CODI_JAX_COORDINATOR", "CODI_JAX_NUM_PROCESSES", "CODI_JAX_PROCESS_ID"),
  ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"),
)


def _explicit(env) -> tuple[str, int, int] | None:
  """(coordinator, num_processes, process_id) from the first complete variable set, else None."""
  for names in _ENV_SETS:
    given = [env.get(n) for n in names]
    if not any(given):
      continue
    missing = [n for n, v in zip(names, given) if not v]
    if missing:
      raise InputError(
        f"environment: {', '.join(missing)} not set (with {names[0]}, all three are needed)"
      )
    try:
      num, pid = int(given[1]), int(given[2])
    except ValueError:
      raise InputError(
        f"environment: {names[1]}={given[1]!r} and {names[2]}={given[2]!r} must be integers"
      ) from None
    if not 0 <= pid < num:
      raise InputError(f"environment: {names[2]}={pid} is outside 0..{num - 1} ({names[1]}={num})")
    return given[0], num, pid
  return None


def plan(env=None) -> dict | None:
  """The `initialize` keyword arguments this environment asks for ({} = auto-detect), or None."""
  env = os.environ if env is None else env
  flag = env.get("CODI_JAX_DISTRIBUTED", "").strip().lower()
  if flag in ("0", "false", "no"):
    return None
  explicit = _explicit(env)
  if explicit is not None:
    coord, num, pid = explicit
    return {"coordinator_address": coord, "num_processes": num, "process_id": pid}
  if flag in ("1", "true", "yes"):
    return {}
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return {}
  try:
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
      return {}
  except ValueError:
    pass
  return None


def maybe_initialize(env=None) -> bool:
  """Initializes `jax.distributed` when the environment asks for it; True if it is running."""
  import jax  # pylint: disable=import-outside-toplevel

  if jax.distributed.is_initialized():
    return True
  kwargs = plan(env)
  if kwargs is None:
    return False
  platforms = (os.environ.get("JAX_PLATFORMS") or "").lower()
  if platforms.startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [""])[0]
    where = kwargs.get("coordinator_address", "auto-detected cluster")
    raise InputError(f"jax.distributed.initialize ({where}): {type(e).__name__}: {first}") from None
  return True


def is_main() -> bool:
  """True on the process that logs and writes files (process 0)."""
  import jax  # pylint: disable=import-outside-toplevel

  return jax.process_index() == 0
