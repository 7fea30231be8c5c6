#!/usr/bin/env bash
# The main job, end to end on the embedded Fashion-MNIST subset (5,000 train / 1,000 test):
# set up ./.venv, then shard -> pretrain (a short run of a default recipe, small-image variant)
# -> embed -> knn + linear, beside the random-init floor, ending with a results table.
#
#   shell/quickstart.sh [WORK_DIR] [RECIPE]        (defaults: quickstart-out, moco_v2)
#
# Rerunning continues where an interrupted run stopped (shell/pipeline.sh skips finished steps).
# QUICKSTART_PRETRAIN_ARGS overrides the short-run flags below.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-quickstart-out}
RECIPE=${2:-moco_v2}

shell/setup.sh
export SSLCTL="$PWD/.venv/bin/sslctl"
export PRETRAIN_ARGS=${QUICKSTART_PRETRAIN_ARGS:-"--epochs 2 --batch-size 128"}
exec shell/pipeline.sh sslctl/_data/fashion-mnist-mini "$WORK" "$RECIPE"
