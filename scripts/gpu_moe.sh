#!/usr/bin/env bash
# On a GPU machine: a mixture of experts (4 layers of Qwen3-30B-A3B's shape, bf16, made by
# make_moe_model.py) through `loraloom bench`, and transformers (+ peft) on the same checkpoint.
# Adapters on attention and the unembedding. Decode with steps recorded as CUDA graphs
# (`--step-graphs cuda`) and issued one by one (`off`): the experts' grouped matmuls read
# nothing back to the host in bf16, so a `cuda` line should record steps and agree with `off`
# (`recorded_vs_eager`).
#
# From a kit built by ../shared/gpu/build.sh:
#   cp scripts/gpu_moe.sh scripts/gpu_common.sh scripts/make_moe_model.py .gpu-kit/
#   then, there:  OUT=<dir> LIMIT=150 bash gpu_moe.sh      (a few minutes on an H200)
# CPU dry run from the project root (`emulate` stands in for `cuda`; a 1-layer model in f32):
#   BIN=target/release/loraloom GRAPHS=emulate PY=.venv/bin/python MOE_LAYERS=1 \
#   TOKENIZER=data/models/SmolLM2-135M-Instruct OUT=/tmp/gmoe bash scripts/gpu_moe.sh
set -u
here="$(cd "$(dirname "$0")" && pwd)"
BIN="${BIN:-$here/loraloom}"
GRAPHS="${GRAPHS:-cuda}"
PY="${PY:-python3}"
MOE_DIR="${MOE_DIR:-$(mktemp -d)/a3b}"
timeout 600 "$PY" "$here/make_moe_model.py" "$MOE_DIR" "${TOKENIZER:-$here}" a3b 2>&1 | tail -1
M="$MOE_DIR"
. "$here/gpu_common.sh"
export RUST_LOG="${RUST_LOG:-warn}"

for mode in "$GRAPHS" off; do
  run "moe_decode_$mode" "$BIN" bench --model "$M" --what decode --step-graphs "$mode"
  grep -m1 -i "recorded as CUDA graphs" "$OUT/moe_decode_$mode.out"
done
run moe_forward_train "$BIN" bench --model "$M" --what forward,train
run moe_engine "$BIN" bench --model "$M" --what engine --tenants 1,16 --steps 3
[ -f "$here/gpu_baseline.py" ] && run moe_baseline "$PY" "$here/gpu_baseline.py" "$M" forward,train,decode
exit 0
