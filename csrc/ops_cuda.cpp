// CUDA implementations of torch.ops.eagle_kernels.* (schemas in ops.cpp). Compiled only in a CUDA build.
//
// No host synchronisation: only metadata (shape, dtype, device) is checked; tree validity is NOT (that would
// need a copy back). An invalid tree gives unspecified, in-bounds outputs; validate on the CPU op when in
// doubt. Kernels run on the current stream, so the ops can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops_common.h"
#include "tree_buffers_cuda.h"

namespace eagle {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_tree_buffers_cuda(
    const at::Tensor& parents_in, std::optional<int64_t> max_depth_opt) {
  const int64_t max_depth = check_tree_args(parents_in, max_depth_opt);
  const c10::cuda::CUDAGuard guard(parents_in.device());
  const at::Tensor parents = parents_in.contiguous();
  const int64_t B = parents.size(0), T = parents.size(1);
  const auto i64 = parents.options().dtype(at::kLong);
  // Uninitialised is fine: the kernel writes every entry.
  at::Tensor mask = at::empty({B, T, T}, parents.options().dtype(at::kBool));
  at::Tensor depth = at::empty({B, T}, i64), first_child = at::empty({B, T}, i64), next_sibling = at::empty({B, T}, i64);
  at::Tensor paths = at::empty({B, T, max_depth + 1}, i64);
  C10_CUDA_CHECK(launch_build_tree_buffers(parents.data_ptr<int64_t>(), B, T, max_depth, mask.data_ptr<bool>(),
                                           depth.data_ptr<int64_t>(), first_child.data_ptr<int64_t>(),
                                           next_sibling.data_ptr<int64_t>(), paths.data_ptr<int64_t>(),
                                           c10::cuda::getCurrentCUDAStream().stream()));
  return {mask, depth, first_child, next_sibling, paths};
}

}  // namespace

TORCH_LIBRARY_IMPL(eagle_kernels, CUDA, m) {
  m.impl("build_tree_buffers", &build_tree_buffers_cuda);
}

}  // namespace eagle
