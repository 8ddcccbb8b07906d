# Sourced by the GPU kit scripts (gpu_first_shape.sh, gpu_decode_ab.sh), with `here` set to the
# script's folder: the output folder, libtorch of the machine's PyTorch on the library path, the
# checkpoint `M` (the kit's random 1.07B Llama shape unless given), and `run`.
OUT="${OUT:-./out}"; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1 NO_COLOR=1
PY="${PY:-python3}"
TL="$("$PY" -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')"
export LD_LIBRARY_PATH="$TL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
M="${M:-}"
if [ -z "$M" ]; then
  S="$(mktemp -d)"
  timeout 120 "$PY" "$here/make_models.py" "$S/m" llama1b 2>&1 | tail -1
  M="$S/m/llama1b"
fi

# run TAG CMD...: the command's output goes to $OUT/TAG.out (each command at most LIMIT
# seconds, default 120); its JSON lines are echoed.
run() {
  local tag=$1; shift
  echo "== $tag"
  timeout "${LIMIT:-120}" "$@" > "$OUT/$tag.out" 2>&1
  echo "rc=$?"
  grep '^{' "$OUT/$tag.out" | cut -c1-400
}
