#!/usr/bin/env bash
# On a GPU machine: where a decode step's time goes, against transformers.generate; then what a
# batch shape seen for the first time costs, with cuDNN's attention
# deprioritized (what `loraloom` sets by default) and without it, plus the decode and engine
# benchmark and the attention probe. BENCHMARKS.md ("Third GPU session") has the cost it checks
# for: 0.12-0.25 s per new shape on an H200 with cuDNN's attention.
#
# Runs from a kit built by ../shared/gpu/build.sh (the `loraloom` binary and make_models.py);
# copy this script and scripts/gpu_attention_probe.py into the kit first:
#   cp scripts/gpu_first_shape.sh scripts/gpu_common.sh scripts/gpu_attention_probe.py .gpu-kit/
#   then, there:  OUT=<dir> bash gpu_first_shape.sh      (about 3 minutes on an H200)
# CPU dry run from the project root: BIN=target/release/loraloom M=data/models/tiny64 \
#   PY=.venv/bin/python OUT=/tmp/gfs bash scripts/gpu_first_shape.sh
set -u
here="$(cd "$(dirname "$0")" && pwd)"
BIN="${BIN:-$here/loraloom}"
. "$here/gpu_common.sh"

# Decode first (issue 11): where a step's time goes (issuing vs waiting for the tokens, and the
# same steps with no host round trip), the decode bench, and transformers.generate on the same
# checkpoint in the same call (the ratio's baseline).
run decode_phases "$BIN" bench --model "$M" --what decode_phases --iters 3
run decode "$BIN" bench --model "$M" --what decode
if [ -f "$here/gpu_baseline.py" ]; then
  run generate "$PY" "$here/gpu_baseline.py" "$M" decode
fi

# Six shapes in one process: after the first (which also pays CUDA's start), each line's
# first_seconds against its seconds is what that new shape cost once.
shapes="16x128,16x96,16x160,8x200,64x128,64x100"
for deprioritized in 1 0; do
  run "train_shapes_cudnn_deprioritized_$deprioritized" \
    env TORCH_CUDNN_SDPA_DEPRIORITIZED=$deprioritized \
    "$BIN" bench --model "$M" --what train --train-shape "$shapes" --train-adapters 8 --iters 3
done
run decode_temperature_1 "$BIN" bench --model "$M" --what decode --temperature 1
run engine "$BIN" bench --model "$M" --what engine --tenants 16,64 --steps 5
if [ -f "$here/gpu_attention_probe.py" ]; then
  run probe_unset env -u TORCH_CUDNN_SDPA_DEPRIORITIZED "$PY" "$here/gpu_attention_probe.py"
  run probe_deprioritized env TORCH_CUDNN_SDPA_DEPRIORITIZED=1 "$PY" "$here/gpu_attention_probe.py"
fi
