// torch.ops.eagle_kernels.*: schemas, CPU and Meta implementations. The CUDA implementations live in
// ops_cuda.cpp (compiled only in a CUDA build) and register under the same schemas.
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops_common.h"
#include "tree_buffers_core.h"
#include "tree_buffers_node.h"

namespace eagle {
namespace {

using TreeTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

TreeTensors empty_tree_outputs(const at::Tensor& parents, int64_t max_depth) {
  const int64_t B = parents.size(0), T = parents.size(1);
  const auto i64 = parents.options().dtype(at::kLong);
  return {at::empty({B, T, T}, parents.options().dtype(at::kBool)), at::empty({B, T}, i64), at::empty({B, T}, i64),
          at::empty({B, T}, i64), at::empty({B, T, max_depth + 1}, i64)};
}

TreeTensors build_tree_buffers_cpu_op(const at::Tensor& parents_in, std::optional<int64_t> max_depth_opt) {
  const int64_t max_depth = check_tree_args(parents_in, max_depth_opt);
  const at::Tensor parents = parents_in.contiguous();
  auto out = empty_tree_outputs(parents, max_depth);
  auto& [mask, depth, first_child, next_sibling, paths] = out;
  const TreeResult r = build_tree_buffers_cpu(parents.data_ptr<int64_t>(), parents.size(0), parents.size(1), max_depth,
                                              mask.data_ptr<bool>(), depth.data_ptr<int64_t>(),
                                              first_child.data_ptr<int64_t>(), next_sibling.data_ptr<int64_t>(),
                                              paths.data_ptr<int64_t>());
  TORCH_CHECK_VALUE(r.ok(), "build_tree_buffers: ", describe(r, max_depth));
  return out;
}

TreeTensors build_tree_buffers_meta(const at::Tensor& parents, std::optional<int64_t> max_depth_opt) {
  return empty_tree_outputs(parents, check_tree_args(parents, max_depth_opt));
}

}  // namespace

TORCH_LIBRARY(eagle_kernels, m) {
  m.def(
      "build_tree_buffers(Tensor parents, int? max_depth=None) -> "
      "(Tensor mask, Tensor depth, Tensor first_child, Tensor next_sibling, Tensor paths)");
}

TORCH_LIBRARY_IMPL(eagle_kernels, CPU, m) {
  m.impl("build_tree_buffers", &build_tree_buffers_cpu_op);
}

// Meta kernels give shapes to FakeTensor tracing (torch.compile) without running anything.
TORCH_LIBRARY_IMPL(eagle_kernels, Meta, m) {
  m.impl("build_tree_buffers", &build_tree_buffers_meta);
}

}  // namespace eagle
