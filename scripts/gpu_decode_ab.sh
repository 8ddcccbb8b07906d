#!/usr/bin/env bash
# On a GPU machine: decode of two loraloom builds, alternately in one call, against
# transformers.generate on the same checkpoint, plus their training step and engine figures.
# Ratios between the builds only mean something within one call (the card is shared).
#
# Runs from a kit built by ../shared/gpu/build.sh; put the other build beside it first:
#   cp <older kit>/loraloom .gpu-kit/loraloom.base
#   cp scripts/gpu_decode_ab.sh scripts/gpu_common.sh .gpu-kit/
#   then, there:  OUT=<dir> bash gpu_decode_ab.sh      (about 4 minutes on an H200)
# CPU dry run from the project root (no transformers there: the generate line fails):
#   NEW=target/release/loraloom BASE=target/release/loraloom M=data/models/tiny64 \
#   PY=.venv/bin/python OUT=/tmp/gab bash scripts/gpu_decode_ab.sh
set -u
here="$(cd "$(dirname "$0")" && pwd)"
NEW="${NEW:-$here/loraloom}"
BASE="${BASE:-$here/loraloom.base}"
. "$here/gpu_common.sh"

for round in 1 2; do
  for build in new base; do
    bin=$NEW; [ "$build" = base ] && bin=$BASE
    run "decode_phases_${build}_$round" "$bin" bench --model "$M" --what decode_phases --iters 3
    run "decode_${build}_$round" "$bin" bench --model "$M" --what decode
  done
done
[ -f "$here/gpu_baseline.py" ] && run generate "$PY" "$here/gpu_baseline.py" "$M" decode
for build in new base; do
  bin=$NEW; [ "$build" = base ] && bin=$BASE
  run "train_$build" "$bin" bench --model "$M" --what train --train-shape 16x128,64x128 \
    --train-adapters 8 --iters 3
done
run engine_new "$NEW" bench --model "$M" --what engine --tenants 16,64 --steps 5
