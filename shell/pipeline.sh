#!/usr/bin/env bash
# From images to a results table: shard -> pretrain -> embed -> knn + linear, beside the
# random-init floor (the same architecture, untrained).
#
#   shell/pipeline.sh IMAGES_DIR WORK_DIR [RECIPE]
#
# IMAGES_DIR: anything `sslctl shard` reads (class folders, idx files, CIFAR batches, a CSV);
# kNN and linear need labels. RECIPE: a recipe name or .toml path [moco_v2].
# Every step is skipped when its artifact already exists, so rerunning the same command after a
# failure (or a batch job's time limit) continues where it stopped; pretrain and embed also
# resume inside a step. Nothing here needs a terminal: logs go to stderr, the results table to
# stdout and WORK_DIR/results.md.
#
# Environment:
#   SSLCTL         the sslctl command [sslctl, else python3 -m sslctl]
#   PRETRAIN_ARGS  extra `sslctl pretrain` flags, e.g. "--epochs 1 --max-steps 100 --batch-size 64"
#   EMBED_ARGS     extra `sslctl embed` flags, e.g. "--batch-size 512"
#   DEVICE         auto | cpu | cuda [auto]
#
# Artifacts in WORK_DIR: shards/ run/ features.safetensors floor.safetensors
#                        knn.jsonl knn-floor.jsonl linear.jsonl linear-floor.jsonl results.md
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 IMAGES_DIR WORK_DIR [RECIPE]" >&2
  exit 2
fi
IMAGES=$1
WORK=$2
RECIPE=${3:-moco_v2}
DEVICE=${DEVICE:-auto}
if [ -z "${SSLCTL:-}" ]; then
  if command -v sslctl >/dev/null 2>&1; then SSLCTL=sslctl; else SSLCTL="python3 -m sslctl"; fi
fi
mkdir -p "$WORK"

log() { echo "pipeline: $*" >&2; }
# shellcheck disable=SC2086  # SSLCTL and *_ARGS are word lists on purpose
sslctl() { command $SSLCTL "$@"; }  # `command`: the program, never this function

# step NAME ARTIFACT COMMAND...: run COMMAND unless ARTIFACT exists.
step() {
  local name=$1 artifact=$2
  shift 2
  if [ -e "$artifact" ]; then
    log "$name: $artifact exists, skipped"
    return 0
  fi
  log "$name ..."
  "$@"
}

# result NAME OUT COMMAND...: COMMAND's stdout (JSON lines) into OUT, only once it succeeded.
result() {
  local name=$1 out=$2
  shift 2
  if [ -e "$out" ]; then
    log "$name: $out exists, skipped"
    return 0
  fi
  log "$name ..."
  "$@" > "$out.tmp"
  mv "$out.tmp" "$out"
}

step shard "$WORK/shards/manifest.json" sslctl shard "$IMAGES" "$WORK/shards" >/dev/null
# shellcheck disable=SC2086
step pretrain "$WORK/run/encoder.safetensors" \
  sslctl pretrain "$WORK/shards" --recipe "$RECIPE" --out "$WORK/run" --device "$DEVICE" ${PRETRAIN_ARGS:-} >/dev/null
# shellcheck disable=SC2086
step embed "$WORK/features.safetensors" \
  sslctl embed "$WORK/run" "$WORK/shards" --out "$WORK/features.safetensors" --device "$DEVICE" ${EMBED_ARGS:-} >/dev/null
# shellcheck disable=SC2086
step "embed (random-init floor)" "$WORK/floor.safetensors" \
  sslctl embed "$WORK/run" "$WORK/shards" --weights random --out "$WORK/floor.safetensors" --device "$DEVICE" ${EMBED_ARGS:-} >/dev/null

if ! grep -q '"labelled": true' "$WORK/shards/manifest.json"; then
  log "the shards have no labels: features are in $WORK/features.safetensors; kNN and linear probes need labelled images"
  exit 0
fi
result knn "$WORK/knn.jsonl" sslctl knn "$WORK/features.safetensors" --device "$DEVICE" --quiet
result "knn (floor)" "$WORK/knn-floor.jsonl" sslctl knn "$WORK/floor.safetensors" --device "$DEVICE" --quiet
result linear "$WORK/linear.jsonl" sslctl linear "$WORK/features.safetensors" --device "$DEVICE" --quiet
result "linear (floor)" "$WORK/linear-floor.jsonl" sslctl linear "$WORK/floor.safetensors" --device "$DEVICE" --quiet

python3 - "$WORK" "$RECIPE" <<'PY' | tee "$WORK/results.md.tmp"
import json, sys
from pathlib import Path

work, recipe = Path(sys.argv[1]), sys.argv[2]
def lines(name):
    return [json.loads(line) for line in (work / name).read_text().splitlines() if line.strip()]
rows = [(f"{recipe} (trained)", ""), ("random init (floor)", "-floor")]
knn_cols = [r["protocol"] for r in lines("knn.jsonl")]
print(f"| encoder | " + " | ".join(f"kNN top-1 {p.split('/', 2)[2]}" for p in knn_cols) + " | linear top-1 |")
print("| --- | " + " | ".join("---:" for _ in knn_cols) + " | ---: |")
for label, suffix in rows:
    knn = {r["protocol"]: r["top1"] for r in lines(f"knn{suffix}.jsonl")}
    (linear,) = lines(f"linear{suffix}.jsonl")
    print(f"| {label} | " + " | ".join(f"{knn[p]:.2f}" for p in knn_cols) + f" | {linear['top1']:.2f} |")
(probe,) = lines("linear.jsonl")
print(f"\nkNN: weighted, cosine (docs/spec/protocols.md E1); linear: {probe['protocol']} (E2). "
      f"Bank {lines('knn.jsonl')[0]['n_bank']} train images, {lines('knn.jsonl')[0]['n_eval']} test images.")
PY
mv "$WORK/results.md.tmp" "$WORK/results.md"
log "results table in $WORK/results.md"
