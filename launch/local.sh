#!/usr/bin/env bash
# Single machine (all local devices): bash launch/local.sh CONFIG WORKDIR [overrides...]
set -euo pipefail
CONFIG="${1:?usage: local.sh CONFIG WORKDIR [overrides...]}"
WORKDIR="${2:?usage: local.sh CONFIG WORKDIR [overrides...]}"
shift 2
mkdir -p "$WORKDIR"
python -m sid_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" 2>&1 | tee -a "$WORKDIR/log.txt"
