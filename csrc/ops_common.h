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

}  // namespace eagle
