#!/usr/bin/env bash
# One sid_jax process on every host of a Cloud TPU pod slice, started over `gcloud ... ssh
# --worker=all`; jax.distributed.initialize() finds the other hosts through the TPU metadata.
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a CONFIG=configs/gmm_sid.py WORKDIR=/mnt/shared/run1 \
#     bash launch/tpu_pod.sh [--config.training.num_steps=...]
# Every host needs the same checkout at REPO_DIR (default ~/sid_jax) with its venv; CONFIG is
# checked against the local checkout holding this script. Environment: PYTHON (remote; default
# .venv/bin/python inside REPO_DIR), LOG_DIR (host logs for gs:// workdirs; default
# /tmp/sid_jax_logs on each host), PROJECT, GCLOUD_ARGS (extra ssh flags). See docs/launching.md.
set -euo pipefail

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

for name in TPU_NAME ZONE CONFIG WORKDIR; do
  [[ -n ${!name:-} ]] || die "$name is not set (e.g. $name=... bash launch/tpu_pod.sh)"
done
local_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config_file=${CONFIG%%:*}
[[ $config_file == /* ]] || config_file=$local_repo/$config_file
[[ -f $config_file ]] || die "config file $config_file does not exist"
command -v gcloud > /dev/null || die "gcloud not found on PATH"

REPO_DIR=${REPO_DIR:-'~/sid_jax'}
PYTHON=${PYTHON:-.venv/bin/python}
if [[ $WORKDIR == gs://* ]]; then
  log_dir=${LOG_DIR:-/tmp/sid_jax_logs}
else
  log_dir=$WORKDIR/logs  # a relative WORKDIR is relative to REPO_DIR on the hosts
fi
read -ra gcloud_args <<< "${GCLOUD_ARGS:-}"
[[ -n ${PROJECT:-} ]] && gcloud_args+=(--project="$PROJECT")

# Runs on every host. Kept to one line (commands joined by '; ') so that the printf %q quoting
# below is plain backslash escaping, which any remote login shell reads back.
host_lines=(
  'set -euo pipefail'
  'repo=$1 python=$2 log_dir=$3'
  'shift 3'
  'case $repo in "~") repo=$HOME ;; "~/"*) repo=$HOME/${repo#"~/"} ;; esac'
  'cd -- "$repo" || { echo "tpu_pod.sh: no checkout at $repo on $(hostname)" >&2; exit 2; }'
  'missing="tpu_pod.sh: no python $python in $repo on $(hostname)"'
  'command -v -- "$python" > /dev/null || { echo "$missing" >&2; exit 2; }'
  'host=$(hostname)'
  'id=${TPU_WORKER_ID:-}'
  '[[ -n $id || $host != *-w-[0-9]* ]] || id=${host##*-w-}'
  'mkdir -p -- "$log_dir"'
  'export SID_JAX_DISTRIBUTED=1'
  '"$python" -m sid_jax.main "$@" 2>&1 | tee -a -- "$log_dir/host_${id:-$host}.txt"'
)
host_script=$(printf '%s; ' "${host_lines[@]}")
remote="bash -c $(printf '%q' "$host_script") tpu_pod"
remote+=" $(printf '%q ' "$REPO_DIR" "$PYTHON" "$log_dir" \
  "--config=$CONFIG" "--workdir=$WORKDIR" "$@")"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all "${gcloud_args[@]}" \
  --command="$remote"
