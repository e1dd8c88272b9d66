#!/usr/bin/env bash
# One process on this machine that uses every local device: a CPU box, a host with several GPUs
# (no jax.distributed needed) or a single-host TPU VM. See docs/launching.md.
#   bash launch/local.sh CONFIG WORKDIR [--config.a.b=v ...]
# CONFIG is configs/NAME.py[:ARG], relative to the repository (or absolute).
# Environment: REPO_DIR (default: the checkout holding this script), PYTHON (default:
# $REPO_DIR/.venv/bin/python), LOG_DIR (host log directory for gs:// workdirs; default
# /tmp/sid_jax_logs). Output goes to the console and to WORKDIR/logs/host_0.txt.
set -euo pipefail

die() { echo "local.sh: $*" >&2; exit 2; }
usage="usage: local.sh CONFIG WORKDIR [overrides...]"

[[ -n ${1:-} ]] || die "CONFIG is not set ($usage)"
[[ -n ${2:-} ]] || die "WORKDIR is not set ($usage)"
CONFIG=$1
WORKDIR=$2
shift 2

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[[ -f $REPO_DIR/sid_jax/main.py ]] || die "REPO_DIR=$REPO_DIR holds no sid_jax/main.py"
config_file=${CONFIG%%:*}
[[ $config_file == /* ]] || config_file=$REPO_DIR/$config_file
[[ -f $config_file ]] || die "config file $config_file does not exist"

PYTHON=${PYTHON:-$REPO_DIR/.venv/bin/python}
[[ $PYTHON == */* && $PYTHON != /* ]] && PYTHON=$PWD/$PYTHON
command -v -- "$PYTHON" > /dev/null \
  || die "no python at PYTHON=$PYTHON (run make venv or set PYTHON)"

if [[ $WORKDIR == gs://* ]]; then
  log_dir=${LOG_DIR:-/tmp/sid_jax_logs}
else
  [[ $WORKDIR == /* ]] || WORKDIR=$PWD/$WORKDIR
  log_dir=$WORKDIR/logs
fi
mkdir -p -- "$log_dir" || die "cannot create $log_dir"

cd -- "$REPO_DIR"
"$PYTHON" -m sid_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" 2>&1 \
  | tee -a -- "$log_dir/host_0.txt"
