#!/usr/bin/env bash
# Cloud TPU VM runbook: create a slice, put the repo on every worker, run one command on all.
#
#   launch/tpu.sh [--dry-run] create [--spot | --preemptible] [EXTRA_GCLOUD_FLAGS...]
#   launch/tpu.sh [--dry-run] ssh-keys        # contact each worker once (first-contact key prompts)
#   launch/tpu.sh [--dry-run] setup           # repo + venv + pip install -e . "jax[tpu]" everywhere
#   launch/tpu.sh [--dry-run] run -- COMMAND...   # on all workers, CODI_JAX_DISTRIBUTED=1, logged
#   launch/tpu.sh [--dry-run] logs [WORKER]   # follow one worker's log (default 0)
#   launch/tpu.sh [--dry-run] delete
#
# Settings (environment):
#   TPU_NAME=codi-tpu  ZONE=us-west4-a  ACCELERATOR_TYPE=v5litepod-16
#   RUNTIME_VERSION=v2-alpha-tpuv5-lite  PROJECT=  (empty: gcloud's default project)
#   REPO_URL=  (git URL to clone on the workers; empty: copy this checkout with `tpu-vm scp`)
#   WORKDIR=   (if set, `run` appends --workdir=$WORKDIR; on a multi-host slice use a path every worker sees, e.g. a gcsfuse mount)
#   PYTHON=python3.11  REMOTE_DIR=codi-jax  REMOTE_VENV=codi-venv  (both under ~ on the workers)
#   NUM_WORKERS=  (hosts in the slice, for ssh-keys; empty: ask gcloud)
#   DRY_RUN=1  (same as --dry-run: print every command, shell-quoted, and run nothing)
set -euo pipefail

TPU_NAME=${TPU_NAME:-codi-tpu}
ZONE=${ZONE:-us-west4-a}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
PROJECT=${PROJECT:-}
REPO_URL=${REPO_URL:-}
WORKDIR=${WORKDIR:-}
PYTHON=${PYTHON:-python3.11}
REMOTE_DIR=${REMOTE_DIR:-codi-jax}
REMOTE_VENV=${REMOTE_VENV:-codi-venv}
NUM_WORKERS=${NUM_WORKERS:-}
DRY_RUN=${DRY_RUN:-0}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARBALL=${TMPDIR:-/tmp}/codi-jax-src.tar.gz

die() {
  echo "tpu.sh: error: $*" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

# shellcheck source=launch/quote.sh
source "$(dirname "${BASH_SOURCE[0]}")/quote.sh"

# All words, quoted and joined by spaces (no newline).
qjoin() {
  local out=() w
  for w in "$@"; do
    out+=("$(q "$w")")
  done
  local IFS=' '
  printf '%s' "${out[*]}"
}

# Runs a command, or prints it (one line) under --dry-run.
x() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(qjoin "$@")"
  else
    "$@"
  fi
}

# --zone=... [--project=...]: on every gcloud command.
where() {
  printf '%s\n' "--zone=$ZONE"
  if [[ -n $PROJECT ]]; then
    printf '%s\n' "--project=$PROJECT"
  fi
}

# gcloud compute tpus tpu-vm VERB TPU_NAME --zone=... [--project=...] ARGS...
tpu_vm() {
  local verb=$1 flags
  shift
  mapfile -t flags < <(where)
  x gcloud compute tpus tpu-vm "$verb" "$TPU_NAME" "${flags[@]}" "$@"
}

# gcloud compute tpus tpu-vm scp LOCAL TPU_NAME:REMOTE --zone=... [--project=...] --worker=all
scp_to_all() {
  local flags
  mapfile -t flags < <(where)
  x gcloud compute tpus tpu-vm scp "$1" "$TPU_NAME:$2" "${flags[@]}" --worker=all
}

# A path under the workers' home directory, for a remote command (the tilde expands there).
remote_path() {
  # shellcheck disable=SC2088  # the tilde is for the remote shell
  printf '~/%s' "$(q "$1")"
}

on_all() {
  tpu_vm ssh --worker=all --command="$1"
}

cmd_create() {
  # Extra flags (--spot, --preemptible, --network=..., ...) go to gcloud as given.
  tpu_vm create --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "$@"
}

cmd_ssh_keys() {
  local n=$NUM_WORKERS
  if [[ -z $n ]]; then
    if [[ $DRY_RUN == 1 ]]; then
      die "ssh-keys under --dry-run needs NUM_WORKERS (a real run asks gcloud for it)"
    fi
    n=$(tpu_vm describe --format='value(networkEndpoints.len())')
  fi
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "NUM_WORKERS=$n: not a positive integer"
  local i
  for ((i = 0; i < n; i++)); do
    tpu_vm ssh --worker="$i" --command=true
  done
}

cmd_setup() {
  local dir venv get install
  dir=$(remote_path "$REMOTE_DIR")
  venv=$(remote_path "$REMOTE_VENV")
  if [[ -n $REPO_URL ]]; then
    get="if [ -d $dir/.git ]; then git -C $dir pull --ff-only;"
    get+=" else git clone $(q "$REPO_URL") $dir; fi"
  else
    # Tracked and untracked-but-not-ignored files: what `git status` calls the working tree.
    if [[ $DRY_RUN == 1 ]]; then
      printf '%s | %s\n' "$(qjoin git -C "$REPO_ROOT" ls-files -z -co --exclude-standard)" \
        "$(qjoin tar -czf "$TARBALL" -C "$REPO_ROOT" --null -T -)"
    else
      git -C "$REPO_ROOT" ls-files -z -co --exclude-standard |
        tar -czf "$TARBALL" -C "$REPO_ROOT" --null -T -
    fi
    scp_to_all "$TARBALL" codi-jax-src.tar.gz
    get="mkdir -p $dir && tar -xzf ~/codi-jax-src.tar.gz -C $dir"
  fi
  local py
  py=$(q "$PYTHON")
  install="{ $py -c 'import ensurepip' 2>/dev/null ||"
  install+=" { sudo apt-get update -qq && sudo apt-get install -y -qq $py $py-venv; }; }"
  install+=" && $py -m venv $venv && $venv/bin/pip install -q -U pip"
  install+=" && $venv/bin/pip install -q -e $dir 'jax[tpu]'"
  on_all "set -e; $get; $install"
}

cmd_run() {
  [[ ${1:-} == -- ]] && shift
  (($#)) || die "run: no command (launch/tpu.sh run -- python -m codi_jax.train --config=...)"
  local cmd=("$@")
  if [[ -n $WORKDIR ]]; then
    cmd+=("--workdir=$WORKDIR")
  fi
  local dir venv
  dir=$(remote_path "$REMOTE_DIR")
  venv=$(remote_path "$REMOTE_VENV")
  local remote="set -o pipefail; mkdir -p ~/codi_logs && cd $dir && . $venv/bin/activate"
  remote+=" && export CODI_JAX_DISTRIBUTED=1"
  remote+=" && $(qjoin "${cmd[@]}") 2>&1 | tee -a ~/codi_logs/\$(hostname).log"
  on_all "$remote"
}

cmd_logs() {
  local worker=${1:-0}
  [[ $worker =~ ^[0-9]+$ ]] || die "logs: worker '$worker' is not a number"
  tpu_vm ssh --worker="$worker" --command="tail -n 100 -F ~/codi_logs/\$(hostname).log"
}

cmd_delete() {
  tpu_vm delete
}

main() {
  while (($#)); do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      -*) die "unknown option '$1' (see --help)" ;;
      *) break ;;
    esac
    shift
  done
  (($#)) || die "no subcommand (create, ssh-keys, setup, run, logs, delete; see --help)"
  local sub=$1
  shift
  # --dry-run may also follow the subcommand (before `--` for run).
  local args=()
  while (($#)); do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      --) args+=("$@"); break ;;
      *) args+=("$1") ;;
    esac
    shift
  done
  [[ $DRY_RUN == 1 || $DRY_RUN == 0 ]] || die "DRY_RUN=$DRY_RUN: use 0 or 1"
  set -- ${args[@]+"${args[@]}"}
  case $sub in
    create) cmd_create "$@" ;;
    ssh-keys) cmd_ssh_keys "$@" ;;
    setup) (($# == 0)) || die "setup: takes no arguments"; cmd_setup ;;
    run) cmd_run "$@" ;;
    logs) (($# <= 1)) || die "logs: at most one worker"; cmd_logs "$@" ;;
    delete) (($# == 0)) || die "delete: takes no arguments"; cmd_delete ;;
    *) die "unknown subcommand '$sub' (create, ssh-keys, setup, run, logs, delete)" ;;
  esac
}

main "$@"
