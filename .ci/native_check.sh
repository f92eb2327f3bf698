#!/usr/bin/env bash
# Configure, build and test csrc/ with CMake in a temporary build directory: the C++ tests (under ASan/UBSan)
# and, when nvcc is on PATH (or CUDACXX is set), a compile of every csrc/*.cu for sm_80 and sm_90.
# No GPU is needed. Usage: .ci/native_check.sh  (MAX_JOBS caps build parallelism; default: all cores)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$(mktemp -d "${TMPDIR:-/tmp}/eagle-native-XXXXXX")"
trap 'rm -rf "$build"' EXIT

args=(-DCMAKE_BUILD_TYPE=Release -DEAGLE_KERNELS_SANITIZE=ON)
if command -v ninja >/dev/null 2>&1; then args+=(-G Ninja); fi
if [[ -z "${CUDACXX:-}" ]] && command -v nvcc >/dev/null 2>&1; then
  args+=(-DCMAKE_CUDA_COMPILER="$(command -v nvcc)")
fi

start=$SECONDS
cmake -S "$root" -B "$build" "${args[@]}"
cmake --build "$build" --parallel "${MAX_JOBS:-$(nproc)}"
ctest --test-dir "$build" --output-on-failure
echo "native_check: OK in $((SECONDS - start)) s"
