#!/usr/bin/env bash
# Several GPU nodes under SLURM: srun starts one process per node, which drives all GPUs of its
# node, and jax.distributed.initialize() reads SLURM's variables. See docs/launching.md.
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_multinode.sh \
#     CONFIG WORKDIR [--config.a.b=v ...]
# WORKDIR must be on a filesystem that every node sees. Environment: REPO_DIR (default: the
# checkout holding this script, else $SLURM_SUBMIT_DIR), PYTHON (default:
# $REPO_DIR/.venv/bin/python), LOG_DIR (host logs for gs:// workdirs; default /tmp/sid_jax_logs),
# PROCESS_PER (node: default; gpu: one task per GPU, see the docs), SRUN_ARGS (extra srun flags).
set -euo pipefail

die() { echo "gpu_multinode.sh: $*" >&2; exit 2; }
usage="usage: gpu_multinode.sh CONFIG WORKDIR [overrides...]"

[[ -n ${1:-} ]] || die "CONFIG is not set ($usage)"
[[ -n ${2:-} ]] || die "WORKDIR is not set ($usage)"
CONFIG=$1
WORKDIR=$2
shift 2

# sbatch runs a copy of this script from its spool directory, so the submit directory is the
# fallback for finding the checkout.
if [[ -z ${REPO_DIR:-} ]]; then
  REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [[ ! -f $REPO_DIR/sid_jax/main.py && -n ${SLURM_SUBMIT_DIR:-} ]]; then
    REPO_DIR=$SLURM_SUBMIT_DIR
  fi
fi
[[ -f $REPO_DIR/sid_jax/main.py ]] \
  || die "REPO_DIR=$REPO_DIR holds no sid_jax/main.py (set REPO_DIR)"
config_file=${CONFIG%%:*}
[[ $config_file == /* ]] || config_file=$REPO_DIR/$config_file
[[ -f $config_file ]] || die "config file $config_file does not exist"

PYTHON=${PYTHON:-$REPO_DIR/.venv/bin/python}
[[ $PYTHON == */* && $PYTHON != /* ]] && PYTHON=$PWD/$PYTHON
command -v -- "$PYTHON" > /dev/null \
  || die "no python at PYTHON=$PYTHON (run make venv or set PYTHON)"

PROCESS_PER=${PROCESS_PER:-node}
[[ $PROCESS_PER == node || $PROCESS_PER == gpu ]] \
  || die "PROCESS_PER=$PROCESS_PER is not node or gpu"
command -v srun > /dev/null || die "srun not found: run this inside a SLURM allocation (sbatch)"
read -ra srun_args <<< "${SRUN_ARGS:-}"

if [[ $WORKDIR == gs://* ]]; then
  log_dir=${LOG_DIR:-/tmp/sid_jax_logs}  # created on every node by the task below
else
  [[ $WORKDIR == /* ]] || WORKDIR=$PWD/$WORKDIR
  log_dir=$WORKDIR/logs
  mkdir -p -- "$log_dir" || die "cannot create $log_dir"
fi

# Runs once per task. Its arguments travel as argv (no re-parsing), so quoting stays intact.
# With one process per node, JAX would only give each process GPU number SLURM_LOCALID, so the
# task lists all GPUs it sees in JAX_LOCAL_DEVICE_IDS unless that is already set.
task='
set -euo pipefail
repo=$1 python=$2 log_dir=$3 per=$4
shift 4
cd -- "$repo"
export SID_JAX_DISTRIBUTED=1
if [[ $per == node && -z ${JAX_LOCAL_DEVICE_IDS:-} ]]; then
  n=0
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
    n=${#gpus[@]}
  elif [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    n=$SLURM_GPUS_ON_NODE
  fi
  if (( n > 0 )); then
    ids=0
    for (( i = 1; i < n; i++ )); do ids+=,$i; done
    export JAX_LOCAL_DEVICE_IDS=$ids
  else
    echo "gpu_multinode.sh: no GPU count on $(hostname); JAX will use one GPU per process" >&2
  fi
fi
mkdir -p -- "$log_dir"
"$python" -m sid_jax.main "$@" 2>&1 | tee -a -- "$log_dir/host_${SLURM_PROCID}.txt"
'

srun --kill-on-bad-exit=1 "${srun_args[@]}" bash -c "$task" gpu_multinode \
  "$REPO_DIR" "$PYTHON" "$log_dir" "$PROCESS_PER" \
  --config="$CONFIG" --workdir="$WORKDIR" "$@"
