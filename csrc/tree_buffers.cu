// CUDA kernels of the tree bookkeeping ops. Deliberately free of torch headers (see tree_buffers_cuda.h).
//
// Sizes in decoding are tiny (B <= 8, T <= 64: a few thousand output bytes), so the kernel is one launch
// of flat 1-D threads and its cost is the launch itself; thread-per-node keeps it at one launch (a
// level-by-level build would need depth launches or a grid sync).
#include "tree_buffers_cuda.h"
#include "tree_buffers_node.h"

namespace eagle {
namespace {

constexpr int kThreads = 128;

inline unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

__global__ void build_tree_buffers_kernel(const int64_t* __restrict__ parents, int64_t B, int64_t T,
                                          int64_t max_depth, bool* __restrict__ mask, int64_t* __restrict__ depth,
                                          int64_t* __restrict__ first_child, int64_t* __restrict__ next_sibling,
                                          int64_t* __restrict__ paths) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // e = b * T + i
  if (e >= B * T) return;
  const int64_t b = e / T, i = e - b * T;
  tree_node_buffers(parents + b * T, T, max_depth, i, mask + e * T, depth + e, first_child + e, next_sibling + e,
                    paths + e * (max_depth + 1));
}

}  // namespace

cudaError_t launch_build_tree_buffers(const int64_t* parents, int64_t B, int64_t T, int64_t max_depth, bool* mask,
                                      int64_t* depth, int64_t* first_child, int64_t* next_sibling, int64_t* paths,
                                      cudaStream_t stream) {
  if (B * T == 0) return cudaSuccess;
  build_tree_buffers_kernel<<<blocks_for(B * T), kThreads, 0, stream>>>(parents, B, T, max_depth, mask, depth,
                                                                       first_child, next_sibling, paths);
  return cudaGetLastError();
}

}  // namespace eagle
