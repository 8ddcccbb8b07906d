#!/usr/bin/env bash
# On a GPU machine: decode with steps recorded as CUDA graphs (`--step-graphs cuda`) against
# the same build issuing them one by one (`off`), alternately in one call, and
# transformers.generate on the same checkpoint. Each `cuda` line also says how its outputs
# compare with steps issued one by one (`recorded_vs_eager`: sequences equal token for token,
# the largest log-probability difference over their common prefixes, steps recorded and
# replayed; recorded 0 means the capture failed: see the warning in its .out file).
#
# Runs from a kit built by ../shared/gpu/build.sh, whose build venv needs CUDA's crt/ headers
# (requirements.txt's nvidia-cuda-crt; without them the kit builds without graphs, with a cargo
# warning, and every `cuda` line here records 0 steps):
#   /tmp/torch211-venv/bin/pip install nvidia-cuda-crt==13.0.88   (once the build made the venv)
#   bash ../shared/gpu/build.sh
#   cp scripts/gpu_graphs.sh scripts/gpu_common.sh .gpu-kit/
#   then, there:  OUT=<dir> LIMIT=150 bash gpu_graphs.sh      (about 5 minutes on an H200)
# CPU dry run from the project root (`emulate` stands in for `cuda`; no transformers there, so
# the generate line fails):
#   BIN=target/release/loraloom M=data/models/tiny64 GRAPHS=emulate PY=.venv/bin/python \
#   OUT=/tmp/ggr bash scripts/gpu_graphs.sh
set -u
here="$(cd "$(dirname "$0")" && pwd)"
BIN="${BIN:-$here/loraloom}"
GRAPHS="${GRAPHS:-cuda}"
. "$here/gpu_common.sh"
export RUST_LOG="${RUST_LOG:-warn}"

for round in 1 2; do
  for mode in "$GRAPHS" off; do
    run "decode_${mode}_$round" "$BIN" bench --model "$M" --what decode --step-graphs "$mode"
    grep -m1 -i "recorded as CUDA graphs" "$OUT/decode_${mode}_$round.out"
  done
done
for mode in "$GRAPHS" off; do
  run "decode_t1_$mode" "$BIN" bench --model "$M" --what decode --temperature 1 --step-graphs "$mode"
done
# An RL group whose 32 sequences end at different steps: with `off` each leaving row costs a
# copy of the batch's cache; recorded steps keep finished rows (parked) until they outnumber
# the live ones. On the CPU parking costs more than the copies (default model, 2026-11-28).
for mode in "$GRAPHS" off; do
  run "staggered_$mode" "$BIN" bench --model "$M" --what decode_staggered --new-tokens 128 \
    --temperature 1 --step-graphs "$mode"
done
# Issue 11: does a seeded request draw the same tokens alone and among 31 others? In bf16 (the
# GPU's default) and in f32 (`--dtype f32`), with the decode throughput of f32 beside it.
for dtype in bf16 f32; do
  run "seeded_crowd_$dtype" "$BIN" bench --model "$M" --what seeded_crowd --new-tokens 64 --dtype "$dtype"
done
run "decode_f32" "$BIN" bench --model "$M" --what decode --dtype f32
[ -f "$here/gpu_baseline.py" ] && run generate "$PY" "$here/gpu_baseline.py" "$M" decode
exit 0
