#!/usr/bin/env bash
# On a GPU machine: a mixture of experts (4 layers of Qwen3-30B-A3B's shape, bf16, made by
# make_moe_model.py) through `loraloom bench`, and transformers (+ peft) on the same checkpoint.
# Adapters on attention and the unembedding. Decode with steps recorded as CUDA graphs
# (`--step-graphs cuda`) and issued one by one (`off`): the experts' grouped matmuls read
# nothing back to the host in bf16, so a `cuda` line should record steps and agree with `off`
# (`recorded_vs_eager`).
#
# Then GPT-OSS (MOE_LAYERS layers of gpt-oss-20b's shape, its experts in MXFP4 as OpenAI ships
# them) with the experts kept packed (`--mxfp4 packed`: each layer dequantizes them as it runs)
# and dequantized at load: what keeping them packed costs in time, and what it saves
# (`weight_bytes` of each run's `model` line).
#
# From a kit built by ../shared/gpu/build.sh:
#   cp scripts/gpu_moe.sh scripts/gpu_common.sh scripts/make_moe_model.py \
#      tests/oracles/tiny_models.py .gpu-kit/
#   then, there:  OUT=<dir> LIMIT=150 bash gpu_moe.sh      (a few minutes on an H200)
# CPU dry run from the project root (`emulate` stands in for `cuda`; 1-layer models in f32;
# OSS_SHAPE=oss_bench gives GPT-OSS a small shape, whose 20b layer takes minutes to make here):
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

if [ "${OSS:-1}" != 0 ]; then
  OSS_SHAPE="${OSS_SHAPE:-oss20b}"
  OSS_DIR="${OSS_DIR:-$(mktemp -d)/$OSS_SHAPE}"
  timeout 600 "$PY" "$here/make_moe_model.py" "$OSS_DIR" "${TOKENIZER:-$here}" "$OSS_SHAPE" 2>&1 | tail -1
  for mxfp4 in packed dequantize; do
    run "oss_$mxfp4" "$BIN" bench --model "$OSS_DIR" --mxfp4 "$mxfp4" --what forward,train,decode
  done
fi
exit 0
