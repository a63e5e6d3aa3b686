#!/usr/bin/env bash
# Multi-node GPU without a scheduler: run this on every node; it starts one process per GPU.
#
#   NODE_RANK=0 NUM_NODES=2 COORDINATOR=10.0.0.1:8476 GPUS_PER_NODE=8 \
#     launch/gpu_multinode.sh [--dry-run] -- python -m codi_jax.train --config=... --workdir=...
#
# NODE_RANK: this node, 0..NUM_NODES-1. COORDINATOR: host:port of node 0, reachable from all nodes.
# GPUS_PER_NODE: default the count from `nvidia-smi -L`. LOG_DIR: if set, also write
# LOG_DIR/process_I.log. Process I = NODE_RANK * GPUS_PER_NODE + local GPU, on that GPU only.
# The first process to fail stops the others on this node (SIGTERM, SIGKILL after GRACE_S=10 s);
# SIGINT/SIGTERM to this script reach the processes as SIGTERM (the trainer checkpoints, exits 0).
# --dry-run (or DRY_RUN=1) prints each process's variables and command, and runs nothing.
set -euo pipefail

die() {
  echo "gpu_multinode.sh: error: $*" >&2
  exit 2
}

# shellcheck source=launch/quote.sh
source "$(dirname "${BASH_SOURCE[0]}")/quote.sh"

# `wait -n -p` (below) is bash 5.1.
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) || die "needs bash >= 5.1, not $BASH_VERSION"

DRY_RUN=${DRY_RUN:-0}
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --) shift; break ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option '$1' (the command goes after --)" ;;
    *) break ;;
  esac
  shift
done
(($#)) || die "no command (e.g. -- python -m codi_jax.train --config=...)"

for v in NODE_RANK NUM_NODES COORDINATOR; do
  [[ -n ${!v:-} ]] || die "$v is not set"
done
if [[ -z ${GPUS_PER_NODE:-} ]]; then
  command -v nvidia-smi >/dev/null || die "GPUS_PER_NODE is not set (and nvidia-smi is not found)"
  GPUS_PER_NODE=$(nvidia-smi -L | grep -c '^GPU ')
fi
GRACE_S=${GRACE_S:-10}
[[ $NUM_NODES =~ ^[1-9][0-9]*$ ]] || die "NUM_NODES=$NUM_NODES: not a positive integer"
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE=$GPUS_PER_NODE: not a positive integer"
if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || ((NODE_RANK >= NUM_NODES)); then
  die "NODE_RANK=$NODE_RANK: must be in 0..$((NUM_NODES - 1))"
fi
[[ $COORDINATOR == ?*:[0-9]* ]] || die "COORDINATOR=$COORDINATOR: expected host:port"
[[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN=$DRY_RUN: use 0 or 1"

num_processes=$((NUM_NODES * GPUS_PER_NODE))

# The variables of local GPU $1, one NAME=VALUE per line.
process_env() {
  printf '%s\n' "CUDA_VISIBLE_DEVICES=$1" "CODI_JAX_COORDINATOR=$COORDINATOR" \
    "CODI_JAX_NUM_PROCESSES=$num_processes" \
    "CODI_JAX_PROCESS_ID=$((NODE_RANK * GPUS_PER_NODE + $1))" \
    PYTHONUNBUFFERED=1  # lines arrive as printed
}

if [[ $DRY_RUN == 1 ]]; then
  for ((i = 0; i < GPUS_PER_NODE; i++)); do
    words=()
    while IFS= read -r kv; do
      words+=("${kv%%=*}=$(q "${kv#*=}")")
    done < <(process_env "$i")
    for w in "$@"; do
      words+=("$(q "$w")")
    done
    echo "${words[*]}"
  done
  exit 0
fi

if [[ -n ${LOG_DIR:-} ]]; then
  mkdir -p "$LOG_DIR"
fi

# Copies stdin to stdout line by line with a [pI] prefix (and to LOG_DIR/process_I.log).
prefix() {
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[p%s] %s\n' "$1" "$line"
  done
}
output() {
  if [[ -n ${LOG_DIR:-} ]]; then
    tee -a "$LOG_DIR/process_$1.log" | prefix "$1"
  else
    prefix "$1"
  fi
}

declare -A alive  # pid -> process id
for ((i = 0; i < GPUS_PER_NODE; i++)); do
  mapfile -t vars < <(process_env "$i")
  pid=$((NODE_RANK * GPUS_PER_NODE + i))
  env "${vars[@]}" "$@" > >(output "$pid") 2>&1 &
  alive[$!]=$pid
done

stop() {  # stop SIGNAL: signals every process still running
  local p
  for p in "${!alive[@]}"; do
    kill -s "$1" "$p" 2>/dev/null || true
  done
}
# Background processes of a script ignore SIGINT, so both signals go on as SIGTERM.
trap 'stop TERM' INT TERM

status=0
killer=
while ((${#alive[@]})); do
  done_pid=
  if wait -n -p done_pid "${!alive[@]}"; then rc=0; else rc=$?; fi
  [[ -n ${done_pid:-} ]] || continue  # `wait` interrupted by a trapped signal
  failed=${alive[$done_pid]}
  unset "alive[$done_pid]"
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "gpu_multinode.sh: process $failed exited with $rc; stopping the others" >&2
    stop TERM
    if ((${#alive[@]})); then
      # Off our stdout, or its sleep would hold the caller's pipe open.
      (sleep "$GRACE_S" && kill -s KILL "${!alive[@]}") >/dev/null 2>&1 &
      killer=$!
    fi
  fi
done
if [[ -n $killer ]]; then
  kill "$killer" 2>/dev/null || true
fi
exit "$status"
