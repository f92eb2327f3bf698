#!/usr/bin/env bash
# Configure, build and test csrc/ with CMake in a temporary build directory: the C++ tests (under ASan/UBSan),
# a compile of every csrc/*.cu with nvcc for sm_80 and sm_90, and a -fsyntax-only pass of the CUDA C++ glue
# (csrc/ops_cuda.cpp, which only a CUDA build of torch compiles) against torch's headers and the CUDA runtime
# headers. No GPU is needed. Usage: .ci/native_check.sh  (MAX_JOBS caps build parallelism; default: all cores)
# nvcc: CUDACXX, else `nvcc` on PATH. Without one the CUDA steps are skipped with a note, except under
# EAGLE_REQUIRE_CUDA=1 (CI sets it), where a missing nvcc or CUDA header is an error: CUDA code that nothing
# compiles breaks unseen on the GPU host.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$(mktemp -d "${TMPDIR:-/tmp}/eagle-native-XXXXXX")"
trap 'rm -rf "$build"' EXIT
require_cuda="${EAGLE_REQUIRE_CUDA:-0}"

die() { echo "native_check: ERROR: $*" >&2; exit 1; }
nvcc="${CUDACXX:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" ]]; then
  [[ "$require_cuda" == 1 ]] && die "EAGLE_REQUIRE_CUDA=1 but no nvcc (set CUDACXX or put nvcc on PATH; pip: nvidia-cuda-nvcc)"
  echo "native_check: no nvcc; skipping the CUDA compile checks"
fi

args=(-DCMAKE_BUILD_TYPE=Release -DEAGLE_KERNELS_SANITIZE=ON)
if command -v ninja >/dev/null 2>&1; then args+=(-G Ninja); fi
[[ -n "$nvcc" ]] && args+=(-DCMAKE_CUDA_COMPILER="$nvcc")

start=$SECONDS
cmake -S "$root" -B "$build" "${args[@]}"
cmake --build "$build" --parallel "${MAX_JOBS:-$(nproc)}"
ctest --test-dir "$build" --output-on-failure

if [[ -n "$nvcc" ]]; then
  n_cu=$(find "$root/csrc" -maxdepth 1 -name '*.cu' | wc -l)
  n_obj=$(find "$build" -name '*.cu.o' | wc -l)
  [[ "$n_obj" -eq "$n_cu" && "$n_cu" -gt 0 ]] || die "$n_cu csrc/*.cu files but $n_obj CUDA objects were built"
  for sm in 80 90; do  # the nvcc flags CMake wrote (build.ninja, or flags.make for Makefiles)
    grep -rqs --include=build.ninja --include=flags.make "code=\[compute_$sm,sm_$sm\]" "$build" \
      || die "the .cu files were not compiled for sm_$sm"
  done
  echo "native_check: $n_cu .cu file(s) compiled by $("$nvcc" --version | tail -1) for sm_80 and sm_90"

  # ops_cuda.cpp: -fsyntax-only with EAGLE_WITH_CUDA, as setup.py compiles it in a CUDA build. The CUDA runtime
  # headers come from nvcc's own include dir (the nvidia-cuda-runtime wheel's files where nvcc came from pip).
  # (nvcc may be a wrapper script: ask it for its include dir rather than resolving its path)
  cuda_inc="$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^" ]*\).*/\1/p' | head -1)"
  [[ -f "$cuda_inc/cuda_runtime_api.h" ]] || die "no cuda_runtime_api.h in $cuda_inc (install nvidia-cuda-runtime)"
  torch_inc="$(python -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))')"
  # A CPU build of torch ships c10/cuda/ without the header its CMake generates for CUDA builds: supply it.
  mkdir -p "$build/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$build/stub/c10/cuda/impl/cuda_cmake_macros.h"
  isystem=(-isystem "$build/stub"); for d in $torch_inc; do isystem+=(-isystem "$d"); done
  t0=$SECONDS
  "${CXX:-c++}" -std=c++20 -fsyntax-only -Wall -Wextra -Werror -DEAGLE_WITH_CUDA "${isystem[@]}" \
    -isystem "$cuda_inc" -I"$root/csrc" "$root/csrc/ops_cuda.cpp" \
    || die "csrc/ops_cuda.cpp does not compile against torch's and CUDA's headers"
  echo "native_check: csrc/ops_cuda.cpp passes -fsyntax-only against torch + $cuda_inc in $((SECONDS - t0)) s"
fi
echo "native_check: OK in $((SECONDS - start)) s"
