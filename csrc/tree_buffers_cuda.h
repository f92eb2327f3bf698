// Host launchers of the CUDA kernels in tree_buffers.cu. Raw pointers and sizes only, no torch headers, so
// the .cu file compiles with plain nvcc (CMake) as well as inside the torch extension (setup.py).
//
// All launchers are asynchronous on `stream`, never synchronise the host and never validate data (that would
// need a copy back); they are safe to capture in a CUDA graph. They return cudaGetLastError() after the launch.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace eagle {

// See tree_node_buffers (tree_buffers_node.h): one thread per node of B trees of T nodes. Every output entry
// is written, so outputs may be uninitialised. Invalid trees give unspecified (but in-bounds) outputs.
cudaError_t launch_build_tree_buffers(const int64_t* parents, int64_t B, int64_t T, int64_t max_depth, bool* mask,
                                      int64_t* depth, int64_t* first_child, int64_t* next_sibling, int64_t* paths,
                                      cudaStream_t stream);

}  // namespace eagle
