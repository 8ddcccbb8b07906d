#!/usr/bin/env bash
# Fails when the libtorch loraloom builds against ships libtorch_cuda.so but a built binary that
# links libtorch does not list it (rustc's --as-needed drops it unless the build script keeps it;
# see rpath-build.rs). Without it, libtorch never registers CUDA and loraloom silently runs on the
# CPU of a GPU machine. Runs on CPU-only machines too: the PyPI wheel ships libtorch_cuda.so.
#   usage: scripts/check_cuda_link.sh [TARGET_DIR]   (default: target)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
target="${1:-$here/target}"
python="${LORALOOM_PYTHON:-$here/.venv/bin/python}"
libdir="$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
if [ ! -e "$libdir/libtorch_cuda.so" ]; then
  echo "check_cuda_link: $libdir has no libtorch_cuda.so (a CPU-only libtorch): nothing to check"
  exit 0
fi
checked=0
missing=()
while IFS= read -r -d '' bin; do
  needed="$(readelf -d "$bin" 2>/dev/null | grep NEEDED || true)"
  grep -q 'libtorch_cpu\.so' <<<"$needed" || continue
  checked=$((checked + 1))
  grep -q 'libtorch_cuda\.so' <<<"$needed" || missing+=("$bin")
done < <(find "$target"/debug "$target"/release -maxdepth 2 -type f -perm -u+x \
           \( -name 'loraloom' -o -path '*/deps/*' \) ! -name '*.so' ! -name '*.d' -print0 2>/dev/null)
if [ "$checked" -eq 0 ]; then
  echo "check_cuda_link: no built binary links libtorch under $target; build first" >&2
  exit 1
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "check_cuda_link: these binaries link libtorch but not libtorch_cuda.so, so they would never use a GPU:" >&2
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi
echo "check_cuda_link: all $checked binaries linking libtorch also link libtorch_cuda.so"
