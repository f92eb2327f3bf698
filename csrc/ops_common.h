// Shape/dtype checks shared by the CPU and CUDA bindings. Metadata only: nothing here reads tensor data, so
// the CUDA path stays free of host synchronisation.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace eagle {

// Returns max_depth (default T - 1) after checking parents is [B, T>=1] int64.
inline int64_t check_tree_args(const at::Tensor& parents, std::optional<int64_t> max_depth) {
  TORCH_CHECK_VALUE(parents.dim() == 2 && parents.size(1) >= 1, "build_tree_buffers: parents must be [B, T] with T >= 1, got ",
                    parents.sizes());
  TORCH_CHECK_TYPE(parents.scalar_type() == at::kLong, "build_tree_buffers: parents must be int64, got ",
                   parents.scalar_type());
  const int64_t md = max_depth.value_or(parents.size(1) - 1);
  TORCH_CHECK_VALUE(md >= 0, "build_tree_buffers: max_depth must be >= 0, got ", md);
  return md;
}

inline void check_positions_args(const at::Tensor& prefix_len, const at::Tensor& depth) {
  TORCH_CHECK_VALUE(depth.dim() == 2, "tree_positions: depth must be [B, T], got ", depth.sizes());
  TORCH_CHECK_VALUE(prefix_len.dim() == 1 && prefix_len.size(0) == depth.size(0),
                    "tree_positions: prefix_len must be [B] with B = depth.size(0) = ", depth.size(0), ", got ",
                    prefix_len.sizes());
  TORCH_CHECK_TYPE(depth.scalar_type() == at::kLong, "tree_positions: depth must be int64, got ", depth.scalar_type());
  TORCH_CHECK_TYPE(prefix_len.scalar_type() == at::kLong || prefix_len.scalar_type() == at::kInt,
                   "tree_positions: prefix_len must be int32 or int64, got ", prefix_len.scalar_type());
  TORCH_CHECK(prefix_len.device() == depth.device(), "tree_positions: prefix_len is on ", prefix_len.device(),
              " but depth is on ", depth.device());
}

inline void check_advance_args(const at::Tensor& seq_len, const at::Tensor& accept_len) {
  TORCH_CHECK_VALUE(seq_len.dim() == 1 && accept_len.dim() == 1 && seq_len.size(0) == accept_len.size(0),
                    "advance_seq_lens_: seq_len and accept_len must both be [B], got ", seq_len.sizes(), " and ",
                    accept_len.sizes());
  TORCH_CHECK_TYPE(seq_len.scalar_type() == at::kLong || seq_len.scalar_type() == at::kInt,
                   "advance_seq_lens_: seq_len must be int32 or int64, got ", seq_len.scalar_type());
  TORCH_CHECK_TYPE(accept_len.scalar_type() == at::kLong, "advance_seq_lens_: accept_len must be int64, got ",
                   accept_len.scalar_type());
  TORCH_CHECK(seq_len.is_contiguous(), "advance_seq_lens_: seq_len must be contiguous (it is updated in place)");
  TORCH_CHECK(seq_len.device() == accept_len.device(), "advance_seq_lens_: seq_len is on ", seq_len.device(),
              " but accept_len is on ", accept_len.device());
}

}  // namespace eagle
