#!/usr/bin/env bash
# The GPU figure: CIFAR-10, ResNet-18 (small stem), one recipe for a fixed number of epochs on
# one GPU, kNN top-1 at the last epoch (both protocols), with each stage's wall time.
#
#   bench/gpu_cifar10.sh CIFAR10 [WORK]      (CIFAR10: the folder with train/ and test/ class
#                                            folders, or cifar10-jpg.tar.gz; WORK: /tmp/gpu-cifar10)
#
# Environment: RECIPE [simclr], EPOCHS [100], BATCH [512], DEVICE [cuda], PRETRAIN_ARGS (more pretrain flags),
# SSLCTL [.venv/bin/sslctl]. Writes WORK/record.json (also printed on stdout) with the command,
# the machine, the seconds of every stage and the two kNN results. Lightly's published CIFAR-10
# table (ResNet-18, 200 epochs, kNN k=200) is the anchor: MoCo 0.84, SimCLR 0.85, BYOL 0.87.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:?usage: bench/gpu_cifar10.sh CIFAR10_DIR_OR_TAR [WORK]}
WORK=${2:-/tmp/gpu-cifar10}
RECIPE=${RECIPE:-simclr}
EPOCHS=${EPOCHS:-100}
BATCH=${BATCH:-512}
DEVICE=${DEVICE:-cuda}
SSLCTL=${SSLCTL:-.venv/bin/sslctl}
mkdir -p "$WORK"

if [ -f "$SRC" ]; then  # the shared tarball: unpack once
  [ -d "$WORK/images/train" ] || { mkdir -p "$WORK/images" && tar xzf "$SRC" -C "$WORK/images"; }
  SRC="$WORK/images"
fi

t() { date +%s.%N; }
seconds() { python3 -c "print(round($2 - $1, 1))"; }

t0=$(t)
[ -f "$WORK/shards/manifest.json" ] || "$SSLCTL" shard "$SRC" "$WORK/shards" -q >/dev/null
t1=$(t)
# shellcheck disable=SC2086  # PRETRAIN_ARGS is a word list on purpose
"$SSLCTL" pretrain "$WORK/shards" --recipe "$RECIPE" --variant small --out "$WORK/run" --device "$DEVICE" \
  --epochs "$EPOCHS" --batch-size "$BATCH" --views batch ${PRETRAIN_ARGS:-} >/dev/null
t2=$(t)
"$SSLCTL" embed "$WORK/run" "$WORK/shards" --device "$DEVICE" --out "$WORK/features.safetensors" -q >/dev/null
t3=$(t)
"$SSLCTL" knn "$WORK/features.safetensors" --device "$DEVICE" > "$WORK/knn.jsonl"
t4=$(t)

"$(dirname "$SSLCTL")/python" - "$WORK" "$RECIPE" "$EPOCHS" "$BATCH" "${PRETRAIN_ARGS:-}" \
  "$(seconds "$t0" "$t1")" "$(seconds "$t1" "$t2")" "$(seconds "$t2" "$t3")" "$(seconds "$t3" "$t4")" <<'EOF' | tee "$WORK/record.json"
import json, os, platform, sys
work, recipe, epochs, batch, extra, shard_s, pretrain_s, embed_s, knn_s = sys.argv[1:]
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (cpu)"
knn = [json.loads(line) for line in open(f"{work}/knn.jsonl")]
print(json.dumps({
    "benchmark": "gpu-cifar10", "recipe": recipe, "variant": "small", "epochs": int(epochs), "batch": int(batch),
    "pretrain_args": extra, "gpu": gpu, "cpu_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
    "seconds": {"shard": float(shard_s), "pretrain": float(pretrain_s), "embed": float(embed_s), "knn": float(knn_s)},
    "knn": {r["protocol"]: r["top1"] for r in knn},
}))
EOF
