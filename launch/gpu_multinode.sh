#!/usr/bin/env bash
# One process per node under SLURM (srun), all GPUs of a node in that process.
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_multinode.sh \
#     configs/gmm_sid.py /shared/runs/run1 [--config.a.b=v ...]
# jax.distributed.initialize() reads the SLURM environment (coordinator, process ids).
set -euo pipefail
CONFIG="${1:?usage: gpu_multinode.sh CONFIG WORKDIR [overrides...]}"
WORKDIR="${2:?usage: gpu_multinode.sh CONFIG WORKDIR [overrides...]}"
shift 2
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
mkdir -p "$WORKDIR"
srun bash -c "cd '$REPO_DIR' && SID_JAX_DISTRIBUTED=1 .venv/bin/python -m sid_jax.main \
  --config='$CONFIG' --workdir='$WORKDIR' $* 2>&1 | tee -a '$WORKDIR'/log_\${SLURM_PROCID}.txt"
