#!/usr/bin/env bash
# The main job, end to end on the embedded EuroSAT RGB subset (colour satellite images,
# 5,000 train / 1,000 test, 32 px): set up ./.venv, then shard -> pretrain (a short run of a
# recipe's small-image variant, with the short-run settings below) -> embed -> knn + linear,
# beside the random-init floor, ending with a results table.
#
#   shell/quickstart.sh [WORK_DIR] [RECIPE]        (defaults: quickstart-out, simclr)
#
# Rerunning continues where an interrupted run stopped (shell/pipeline.sh skips finished steps).
# QUICKSTART_IMAGES picks another dataset; QUICKSTART_PRETRAIN_ARGS replaces the short-run flags
# below (measured by bench/mainjob_candidates.py, bench/results/mainjob-candidates.md): they
# differ from the recipe's published small variant only where a few minutes on a CPU need it.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-quickstart-out}
RECIPE=${2:-simclr}
IMAGES=${QUICKSTART_IMAGES:-sslctl/_data/eurosat-mini}

shell/setup.sh
export SSLCTL="$PWD/.venv/bin/sslctl"
export PRETRAIN_ARGS=${QUICKSTART_PRETRAIN_ARGS:-"--epochs 2 --batch-size 64 --set encoder.small_stem=false --set schedule.warmup_epochs=0 --set loss.temperature=0.2 --set augment.jitter=[0.4,0.4,0.2,0.02] --set augment.grayscale_p=0 --set augment.crop_scale=[0.3,1.0]"}
exec shell/pipeline.sh "$IMAGES" "$WORK" "$RECIPE"
