# shellcheck shell=bash
# Sourced by tpu.sh and gpu_multinode.sh (slurm_train.sbatch keeps its own copy: sbatch runs a copy
# of the script from a spool directory, where relative files are not found).

# One word, quoted for a POSIX shell the way Python's shlex.quote does it.
q() {
  local LC_ALL=C s=$1 sq="'" rep="'\"'\"'"
  if [[ -n $s && $s != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//"$sq"/"$rep"}"
  fi
}
