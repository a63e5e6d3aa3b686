#!/usr/bin/env bash
# The accelerator benchmark on a GPU machine in one command: no network there, jax (CUDA), flax,
# optax and orbax-checkpoint installed, this checkout copied there with .whl/ inside it.
#
#   make device-wheels      # here, once: .whl/ (4.9 MiB, git ignores it)
#   launch/device_check.sh [--dry] [-- BENCHMARK_FLAGS...]   # there, from the checkout's root
#
# Steps: (1) environment: python, nvidia-smi, jax's devices and versions; (2) the wheels in
# WHEELS (default .whl/) into SITE (default /tmp/codi_jax_site) with --no-index --no-deps, and
# the project itself on PYTHONPATH (no dependencies resolved, nothing built); (3) every entry
# point imports; (4) benchmarks/attention_check.py: cuDNN's fused attention against the einsum
# path (values, gradients, time); (5) benchmarks/accelerator.py, its full preset (meant to finish
# in under 8 minutes on one H100/H200; not yet timed on one), with --attention_impl=cudnn if step 4
# passed, else xla.
# BENCHMARK_FLAGS go to accelerator.py (e.g. --models=llama). If OUT is set, the log and the
# benchmark's JSON are written there (device_check.log, accelerator.json). A failed step is
# reported and the later ones still run; the exit status is 1 if any step failed.
#
# --dry (or DRY=1): the same steps on CPU here (JAX_PLATFORMS=cpu): the benchmark's --smoke
# preset, attention dot_product instead of cudnn; the wheels only if WHEELS holds any (they are
# built for Python 3.12: point PYTHON at one). PYTHON: the interpreter (default python3).
set -euo pipefail

die() {
  echo "device_check.sh: error: $*" >&2
  exit 2
}

DRY=${DRY:-0}
while (($#)); do
  case $1 in
    --dry) DRY=1 ;;
    --) shift; break ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (benchmark flags go after --)" ;;
  esac
  shift
done
[[ $DRY == 0 || $DRY == 1 ]] || die "DRY=$DRY: use 0 or 1"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$REPO/.whl}
SITE=${SITE:-/tmp/codi_jax_site}
OUT=${OUT:-}
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON: not found"
if [[ -n $OUT ]]; then
  mkdir -p "$OUT" || die "OUT=$OUT: cannot create it"
fi

failed=()

step() {
  printf '\n== %s\n' "$*"
}

main() {
  local t0=$SECONDS preset=() impl=cudnn
  export PYTHONUNBUFFERED=1
  if [[ $DRY == 1 ]]; then
    # Tiny shapes: XLA:CPU's LLVM optimisation would cost most of the time and buy nothing.
    export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0"
    preset=(--smoke)
    impl=dot_product
  fi
  echo "device_check.sh: $(date -Iseconds) | $(uname -n) | dry $DRY | repo $REPO"

  step "1. environment"
  "$PYTHON" --version
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  fi
  "$PYTHON" -c 'import jax; print("jax", jax.__version__, "| backend", jax.default_backend(),
"| devices", jax.devices())' || failed+=(environment)

  step "2. wheels and the project"
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  if ((${#wheels[@]})); then
    echo "${#wheels[@]} wheels in $WHEELS ($(du -sh "$WHEELS" | cut -f1)) -> $SITE"
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${wheels[@]}"; then
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
      failed+=(wheels)
    fi
  else
    echo "no wheels in $WHEELS (make device-wheels): the installed packages only"
  fi
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  echo "PYTHONPATH=$PYTHONPATH"

  step "3. imports"
  "$PYTHON" - <<'PY' || failed+=(imports)
import importlib, importlib.metadata as md
for pkg in ("jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "ml-collections",
            "tensorboardX", "gguf", "math-verify"):
  try:
    print(pkg, md.version(pkg), end=" | ")
  except md.PackageNotFoundError:
    print(pkg, "missing", end=" | ")
print()
for mod in ("codi_jax.train", "codi_jax.evaluate", "soft_jax.generate", "soft_jax.evaluate"):
  importlib.import_module(mod)
print("every entry point imports")
PY

  step "4. attention check ($impl vs xla)"
  if ! "$PYTHON" "$REPO/benchmarks/attention_check.py" --impl="$impl" "${preset[@]}"; then
    failed+=("attention $impl")
    impl=xla
  fi

  step "5. accelerator benchmark (attention $impl)"
  local out_flag=()
  [[ -z $OUT ]] || out_flag=(--out="$OUT/accelerator.json")
  "$PYTHON" "$REPO/benchmarks/accelerator.py" "${preset[@]}" --attention_impl="$impl" \
    "${out_flag[@]}" "$@" || failed+=(benchmark)

  echo
  if ((${#failed[@]})); then
    echo "device_check.sh: FAILED: $(IFS=,; echo "${failed[*]}") ($((SECONDS - t0)) s)"
    return 1
  fi
  echo "device_check.sh: ok ($((SECONDS - t0)) s)"
}

cd "$REPO"
if [[ -n $OUT ]]; then
  main "$@" 2>&1 | tee "$OUT/device_check.log"
  exit "${PIPESTATUS[0]}"
fi
main "$@"
