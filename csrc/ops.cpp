// torch.ops.eagle_kernels.*: schemas, CPU and Meta implementations. The CUDA implementations live in
// ops_cuda.cpp (compiled only in a CUDA build) and register under the same schemas.
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
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

at::Tensor tree_positions_cpu(const at::Tensor& prefix_len_in, const at::Tensor& depth_in) {
  check_positions_args(prefix_len_in, depth_in);
  const at::Tensor prefix_len = prefix_len_in.contiguous(), depth = depth_in.contiguous();
  at::Tensor positions = at::empty_like(depth);
  const int64_t T = depth.size(1), n = depth.numel();
  const int64_t* dep = depth.data_ptr<int64_t>();
  int64_t* pos = positions.data_ptr<int64_t>();
  if (prefix_len.scalar_type() == at::kInt) {
    for (int64_t e = 0; e < n; ++e) tree_position_elem(prefix_len.data_ptr<int32_t>(), dep, T, e, pos);
  } else {
    for (int64_t e = 0; e < n; ++e) tree_position_elem(prefix_len.data_ptr<int64_t>(), dep, T, e, pos);
  }
  return positions;
}

at::Tensor tree_positions_meta(const at::Tensor& prefix_len, const at::Tensor& depth) {
  check_positions_args(prefix_len, depth);
  return at::empty_like(depth);
}

void advance_seq_lens_cpu(const at::Tensor& seq_len, const at::Tensor& accept_len_in) {
  check_advance_args(seq_len, accept_len_in);
  const at::Tensor accept_len = accept_len_in.contiguous();
  const int64_t* acc = accept_len.data_ptr<int64_t>();
  for (int64_t b = 0; b < seq_len.size(0); ++b) {
    if (seq_len.scalar_type() == at::kInt) {
      advance_seq_len_elem(seq_len.data_ptr<int32_t>(), acc, b);
    } else {
      advance_seq_len_elem(seq_len.data_ptr<int64_t>(), acc, b);
    }
  }
}

void advance_seq_lens_meta(const at::Tensor& seq_len, const at::Tensor& accept_len) {
  check_advance_args(seq_len, accept_len);
}

}  // namespace

TORCH_LIBRARY(eagle_kernels, m) {
  m.def(
      "build_tree_buffers(Tensor parents, int? max_depth=None) -> "
      "(Tensor mask, Tensor depth, Tensor first_child, Tensor next_sibling, Tensor paths)");
  m.def("tree_positions(Tensor prefix_len, Tensor depth) -> Tensor");
  m.def("advance_seq_lens_(Tensor(a!) seq_len, Tensor accept_len) -> ()");
}

TORCH_LIBRARY_IMPL(eagle_kernels, CPU, m) {
  m.impl("build_tree_buffers", &build_tree_buffers_cpu_op);
  m.impl("tree_positions", &tree_positions_cpu);
  m.impl("advance_seq_lens_", &advance_seq_lens_cpu);
}

// Meta kernels give shapes to FakeTensor tracing (torch.compile) without running anything.
TORCH_LIBRARY_IMPL(eagle_kernels, Meta, m) {
  m.impl("build_tree_buffers", &build_tree_buffers_meta);
  m.impl("tree_positions", &tree_positions_meta);
  m.impl("advance_seq_lens_", &advance_seq_lens_meta);
}

}  // namespace eagle
