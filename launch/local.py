r"""Runs N processes of one command here, joined by `jax.distributed` over loopback (CPU).

  python launch/local.py --num_processes=2 --devices_per_process=2 -- \
      python -m codi_jax.train --config=configs/demo.py --workdir=/tmp/codi_2proc

Each child gets `CODI_JAX_COORDINATOR=127.0.0.1:PORT`, `CODI_JAX_NUM_PROCESSES`,
`CODI_JAX_PROCESS_ID`, `JAX_PLATFORMS=cpu` and D forced host devices; its output is streamed with a
`[pI] ` prefix. The first child to fail stops the others and sets the exit code; SIGINT/SIGTERM
are forwarded to the children (the trainer saves a checkpoint on SIGTERM and exits 0).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

PROG = "local.py"
HOST = "127.0.0.1"
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (`local.py: error: ...`, exit 2) instead of usage + error."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog=PROG,
    usage=f"{PROG} --num_processes=N [options] -- COMMAND...",
    description="Local multi-process launcher on loopback (CPU).",
  )
  p.add_argument("--num_processes", type=int, required=True, help="processes to start")
  p.add_argument("--devices_per_process", type=int, default=1, help="CPU devices per process")
  p.add_argument("--port", type=int, default=0, help="coordinator port (0: pick a free one)")
  p.add_argument("--log_dir", default="", help="also append to DIR/process_I.log per process")
  p.add_argument(
    "--grace_s",
    type=float,
    default=10.0,
    help="after a failure, seconds between SIGTERM and SIGKILL for the others",
  )
  p.add_argument("--dry_run", action="store_true", help="print each process's env and command")
  return p


def free_port(host: str = HOST) -> int:
  """A TCP port that was free a moment ago (the coordinator binds it right after)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def launcher_env(
  process_id: int, num_processes: int, port: int, devices_per_process: int, xla_flags: str = ""
) -> dict[str, str]:
  """The variables the launcher sets for one child (XLA_FLAGS keeps `xla_flags`, minus a count)."""
  kept = [f for f in xla_flags.split() if not f.startswith(_DEVICE_FLAG)]
  return {
    "CODI_JAX_COORDINATOR": f"{HOST}:{port}",
    "CODI_JAX_NUM_PROCESSES": str(num_processes),
    "CODI_JAX_PROCESS_ID": str(process_id),
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": " ".join(kept + [f"{_DEVICE_FLAG}={devices_per_process}"]),
    "PYTHONUNBUFFERED": "1",  # children's lines arrive as printed, not at exit
  }


def child_env(
  base: dict[str, str] | None,
  process_id: int,
  num_processes: int,
  port: int,
  devices_per_process: int = 1,
) -> dict[str, str]:
  """`base` (default: os.environ) plus the launcher's variables for process `process_id`."""
  base = dict(os.environ if base is None else base)
  base.update(
    launcher_env(process_id, num_processes, port, devices_per_process, base.get("XLA_FLAGS", ""))
  )
  return base


def _exit_code(returncode: int) -> int:
  """A child's status as a shell reports it (killed by signal N: 128 + N)."""
  return 128 - returncode if returncode < 0 else returncode


def _signal_group(proc: subprocess.Popen, sig: int):
  """Sends `sig` to the child's process group (it leads its own session), if it still runs."""
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      pass


def _pump(proc: subprocess.Popen, prefix: str, log, lock: threading.Lock):
  """Copies the child's output to stdout line by line, prefixed, and to its log file."""
  for raw in iter(proc.stdout.readline, b""):
    line = raw.decode("utf-8", errors="replace")
    if not line.endswith("\n"):
      line += "\n"
    with lock:
      sys.stdout.write(prefix + line)
      sys.stdout.flush()
      if log is not None:
        log.write(line)
        log.flush()
  proc.stdout.close()


def _run(command: list[str], envs: list[dict[str, str]], log_dir: str, grace_s: float) -> int:
  """Starts one child per env, waits for all; the first failure stops the rest. Exit code."""
  lock = threading.Lock()
  procs, pumps, logs = [], [], []
  received = []  # signals the launcher got, in order

  def forward(signum, frame):
    del frame
    received.append(signum)
    # A second signal means "now": kill instead of asking again.
    sig = signum if len(received) == 1 else signal.SIGKILL
    for p in procs:
      _signal_group(p, sig)

  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    if log_dir:
      os.makedirs(log_dir, exist_ok=True)
    for i, env in enumerate(envs):
      log = open(os.path.join(log_dir, f"process_{i}.log"), "a") if log_dir else None
      logs.append(log)
      try:
        # Own session: a terminal's Ctrl-C reaches only the launcher, which forwards it once.
        proc = subprocess.Popen(
          command,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          stdin=subprocess.DEVNULL,
          start_new_session=True,
        )
      except OSError as e:
        for p in procs:
          _signal_group(p, signal.SIGKILL)
        sys.stderr.write(f"{PROG}: error: cannot start {command[0]!r}: {e.strerror}\n")
        return 2
      procs.append(proc)
      pumps.append(threading.Thread(target=_pump, args=(proc, f"[p{i}] ", log, lock), daemon=True))
      pumps[-1].start()

    status, kill_at = 0, None
    while any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        if status == 0 and p.poll() not in (None, 0):
          status = _exit_code(p.returncode)
          with lock:
            sys.stderr.write(f"{PROG}: process {i} exited with {status}; stopping the others\n")
          for q in procs:
            _signal_group(q, signal.SIGTERM)
          kill_at = time.monotonic() + grace_s
      if kill_at is not None and time.monotonic() >= kill_at:
        for q in procs:
          _signal_group(q, signal.SIGKILL)
        kill_at = None
      time.sleep(0.05)
    if status == 0:
      status = next((_exit_code(p.returncode) for p in procs if p.returncode != 0), 0)
    for t in pumps:
      t.join(timeout=5)
    return status
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    for log in logs:
      if log is not None:
        log.close()


def main(argv: list[str] | None = None) -> int:
  """Parses `argv` (default: sys.argv[1:]) and runs or prints the processes. Exit code."""
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = _parser()
  if "--" in argv:
    split = argv.index("--")
    own, command = argv[:split], argv[split + 1 :]
  else:
    own, command = argv, []
  args = parser.parse_args(own)
  if not command:
    parser.error("no command after '--' (e.g. -- python -m codi_jax.train --config=...)")
  if args.num_processes < 1:
    parser.error(f"--num_processes={args.num_processes}: must be at least 1")
  if args.devices_per_process < 1:
    parser.error(f"--devices_per_process={args.devices_per_process}: must be at least 1")
  if not 0 <= args.port <= 65535:
    parser.error(f"--port={args.port}: must be in 0..65535 (0: pick a free one)")

  port = args.port or free_port()
  if args.dry_run:
    xla_flags = os.environ.get("XLA_FLAGS", "")
    for i in range(args.num_processes):
      env = launcher_env(i, args.num_processes, port, args.devices_per_process, xla_flags)
      assigns = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
      print(" ".join(assigns), shlex.join(command))
    return 0
  envs = [
    child_env(None, i, args.num_processes, port, args.devices_per_process)
    for i in range(args.num_processes)
  ]
  return _run(command, envs, args.log_dir, args.grace_s)


if __name__ == "__main__":
  sys.exit(main())
