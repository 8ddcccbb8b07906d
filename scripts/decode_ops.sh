#!/usr/bin/env bash
# Counts the operations a decode step issues (see scripts/decode_ops.py): callgrind (valgrind)
# over `bench --what decode_phases` on the CPU, one dump per decode step (zeroed on entering
# `Decoder::decode_step_from`, dumped on leaving it). Deterministic, unlike a timing, and the
# same on any device down to libtorch's kernels: the figure that bounds a GPU decode step,
# measured without a GPU. About a minute and a half.
#   usage: scripts/decode_ops.sh [BINARY] [MODEL_DIR] [ROWS]
#   (defaults: target/release/loraloom, data/models/tiny64, 8)
set -euo pipefail
bin="${1:-target/release/loraloom}"
model="${2:-data/models/tiny64}"
rows="${3:-8}"
py="${LORALOOM_PYTHON:-.venv/bin/python}"
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
torch_lib=$("$py" -c 'import torch, os; print(os.path.dirname(torch.__file__) + "/lib")')
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" OMP_NUM_THREADS=1 \
  valgrind --tool=callgrind --callgrind-out-file="$out/cg" \
  --zero-before='loraloom_model::decoder::Decoder::decode_step_from' \
  --dump-after='loraloom_model::decoder::Decoder::decode_step_from' \
  "$bin" bench --model "$model" --what decode_phases --decode-rows "$rows" --iters 1 \
  --device cpu >"$out/bench" 2>"$out/log"
python3 "$(dirname "$0")/decode_ops.py" "$out"/cg.*
