#!/usr/bin/env bash
# Runs one sid_jax job on every host of a Cloud TPU pod slice.
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a CONFIG=configs/gmm_sid.py WORKDIR=gs://bucket/run1 \
#     bash launch/tpu_pod.sh [--config.training.num_steps=...]
# Every host must have the repository at $REPO_DIR with its requirements installed.
set -euo pipefail
: "${TPU_NAME:?Must set TPU_NAME}"
: "${ZONE:?Must set ZONE}"
: "${CONFIG:?Must set CONFIG (e.g. configs/gmm_sid.py:tiny)}"
: "${WORKDIR:?Must set WORKDIR}"
REPO_DIR="${REPO_DIR:-~/sid_jax}"
EXTRA_ARGS="$*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd $REPO_DIR && SID_JAX_DISTRIBUTED=1 .venv/bin/python -m sid_jax.main \
    --config=$CONFIG --workdir=$WORKDIR $EXTRA_ARGS 2>&1 | tee -a /tmp/sid_jax_\$(hostname).log"
